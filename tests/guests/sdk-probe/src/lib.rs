//! An SDK test guest: each input variant exercises one part of the contract.

use std::hint::black_box;

use imagentx_tool::ToolError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Input {
    /// Answer the text back.
    Echo { text: String },
    /// Allocate and touch this many bytes.
    Alloc { bytes: usize },
    /// Loop forever.
    Spin,
    /// Panic.
    Panic,
    /// Fail as a tool.
    Fail { message: String },
    /// Refuse the input as unusable.
    Refuse,
    /// Answer a string of this many bytes.
    Big { bytes: usize },
    /// Read a file.
    Read { path: String },
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Text { text: String },
    Size { bytes: usize },
}

fn probe(input: Input) -> Result<Output, ToolError> {
    Ok(match input {
        Input::Echo { text } => Output::Text { text },
        Input::Alloc { bytes } => {
            let mut v = vec![0u8; bytes];
            for i in (0..bytes).step_by(4096) {
                v[i] = 1;
            }
            Output::Size { bytes: black_box(v).len() }
        }
        Input::Spin => loop {
            black_box(());
        },
        Input::Panic => panic!("sdk-probe panicked on purpose"),
        Input::Fail { message } => return Err(ToolError::new(message)),
        Input::Refuse => return Err(ToolError::invalid_input("refused: nothing to do")),
        Input::Big { bytes } => Output::Text { text: "y".repeat(bytes) },
        Input::Read { path } => Output::Text { text: std::fs::read_to_string(path)? },
    })
}

imagentx_tool::export_tool!(probe);
