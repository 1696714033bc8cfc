//! Write [imagentx-sandbox] tools in Rust: a typed function in, a WebAssembly
//! component out.
//!
//! A tool is a function from an input type to an output type. The input type
//! derives `serde::Deserialize` and `schemars::JsonSchema`, so the sandbox can show
//! an AI agent the real JSON Schema of what the tool accepts; the output type
//! derives `serde::Serialize`. [`export_tool!`] turns the function into the
//! `imagentx:tool` component world (`describe` and `call`, see `wit/tool.wit`):
//!
//! ```no_run
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Input { text: String }
//!
//! #[derive(Serialize)]
//! struct Output { words: usize }
//!
//! fn count(input: Input) -> Result<Output, imagentx_tool::ToolError> {
//!     Ok(Output { words: input.text.split_whitespace().count() })
//! }
//!
//! imagentx_tool::export_tool!(count);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` under
//! `target/wasm32-wasip2/release/` is the tool.
//!
//! # The contract with the sandbox
//!
//! - Input that does not deserialize into the input type is answered with an
//!   `invalid_input` error naming the problem; the function is not called.
//! - `Err(ToolError)` becomes a report with status `tool_error` (or
//!   `invalid_input` for [`ToolError::invalid_input`]) and the error's message.
//! - A panic aborts the instance: the report's status is `crashed` and the panic
//!   message is in its `stderr`.
//! - Inside the sandbox the tool sees `/data` (its user's directory, kept between
//!   calls), `/tmp` (emptied after every call), clocks and random; no network.
//!
//! [imagentx-sandbox]: https://crates.io/crates/imagentx-sandbox

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

extern crate self as imagentx_tool;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Bindings generated from `wit/tool.wit`; used by [`export_tool!`].
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "tool",
        pub_export_macro: true,
        export_macro_name: "__export_tool_world",
        default_bindings_module: "imagentx_tool::bindings",
        runtime_path: "imagentx_tool::__wit_bindgen::rt",
    });
}

/// Why a tool call failed, as the tool reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolError {
    code: ErrorCode,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ErrorCode {
    InvalidInput,
    ToolError,
}

impl ToolError {
    /// The tool ran and failed; the report's status is `tool_error`.
    pub fn new(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::ToolError, message: message.into() }
    }

    /// The input was well-formed JSON of the right shape but unusable (an
    /// unknown command, an empty query); the report's status is `invalid_input`.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::InvalidInput, message: message.into() }
    }

    /// The message the agent will read.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn to_wire(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| self.message.clone())
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

impl From<String> for ToolError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for ToolError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<std::io::Error> for ToolError {
    fn from(error: std::io::Error) -> Self {
        Self::new(error.to_string())
    }
}

impl From<serde_json::Error> for ToolError {
    fn from(error: serde_json::Error) -> Self {
        Self::new(error.to_string())
    }
}

/// The `describe` export: the tool's name, version, description and the JSON
/// Schema of its input type, derived from the handler's signature.
#[doc(hidden)]
pub fn __describe<I, O, E, F>(_handler: &F, name: &str, version: &str, description: &str) -> String
where
    F: Fn(I) -> Result<O, E>,
    I: schemars::JsonSchema,
{
    let schema = schemars::schema_for!(I);
    let info = serde_json::json!({
        "name": name,
        "version": version,
        "description": description,
        "input_schema": schema,
    });
    info.to_string()
}

/// The `call` export: decode the input, run the handler, encode the outcome.
#[doc(hidden)]
pub fn __call<I, O, E, F>(handler: &F, input: &str) -> Result<String, String>
where
    F: Fn(I) -> Result<O, E>,
    I: DeserializeOwned,
    O: Serialize,
    E: Into<ToolError>,
{
    let input: I = serde_json::from_str(input)
        .map_err(|e| ToolError::invalid_input(format!("input does not match the tool's schema: {e}")).to_wire())?;
    let output = handler(input).map_err(|e| e.into().to_wire())?;
    serde_json::to_string(&output)
        .map_err(|e| ToolError::new(format!("output could not be encoded as JSON: {e}")).to_wire())
}

/// Exports a handler function as an `imagentx:tool` component.
///
/// `export_tool!(handler)` takes the tool's name and description from the
/// crate's `Cargo.toml` (`package.name`, `package.description`);
/// `export_tool!(handler, name = "...", description = "...")` sets them. The
/// version is always the crate's. Use it once per crate.
#[macro_export]
macro_rules! export_tool {
    ($handler:path $(,)?) => {
        $crate::export_tool!(
            $handler,
            name = env!("CARGO_PKG_NAME"),
            description = env!("CARGO_PKG_DESCRIPTION")
        );
    };
    ($handler:path, name = $name:expr, description = $description:expr $(,)?) => {
        struct __ImagentxTool;

        impl $crate::bindings::Guest for __ImagentxTool {
            fn describe() -> ::std::string::String {
                $crate::__describe(&$handler, $name, env!("CARGO_PKG_VERSION"), $description)
            }

            fn call(
                input: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                $crate::__call(&$handler, &input)
            }
        }

        $crate::bindings::__export_tool_world!(__ImagentxTool with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, schemars::JsonSchema)]
    struct Input {
        /// Text to count.
        text: String,
    }

    #[derive(Serialize)]
    struct Output {
        words: usize,
    }

    fn count(input: Input) -> Result<Output, ToolError> {
        if input.text.is_empty() {
            return Err(ToolError::invalid_input("text is empty"));
        }
        Ok(Output { words: input.text.split_whitespace().count() })
    }

    #[test]
    fn describe_derives_the_input_schema_from_the_handler() {
        let info: serde_json::Value =
            serde_json::from_str(&__describe(&count, "count", "1.0.0", "Counts words.")).unwrap();
        assert_eq!(info["name"], "count");
        assert_eq!(info["input_schema"]["properties"]["text"]["type"], "string");
        assert_eq!(info["input_schema"]["required"][0], "text");
    }

    #[test]
    fn call_encodes_output_and_errors_as_the_wit_contract_says() {
        assert_eq!(__call(&count, r#"{"text":"a b c"}"#).unwrap(), r#"{"words":3}"#);
        let err: serde_json::Value = serde_json::from_str(&__call(&count, r#"{"text":""}"#).unwrap_err()).unwrap();
        assert_eq!(err["code"], "invalid_input");
        let err: serde_json::Value = serde_json::from_str(&__call(&count, r#"{"txt":1}"#).unwrap_err()).unwrap();
        assert_eq!(err["code"], "invalid_input");
        assert!(err["message"].as_str().unwrap().contains("text"));
    }
}
