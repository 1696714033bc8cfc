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
/// Schema of its input type, derived from the handler's signature; and the
/// schema of its output when [`export_tool!`] found one (see [`__OutputOf`]).
#[doc(hidden)]
pub fn __describe<I, O, E, F>(
    _handler: &F,
    name: &str,
    version: &str,
    description: &str,
    output_schema: Option<serde_json::Value>,
) -> String
where
    F: Fn(I) -> Result<O, E>,
    I: schemars::JsonSchema,
{
    let schema = schemars::schema_for!(I);
    let mut info = serde_json::json!({
        "name": name,
        "version": version,
        "description": description,
        "input_schema": schema,
    });
    if let Some(output_schema) = output_schema {
        info["output_schema"] = output_schema;
    }
    info.to_string()
}

/// The output type of a handler, to ask whether it has a JSON Schema.
///
/// An output type that derives `schemars::JsonSchema` gets its schema
/// described (MCP clients see it as the tool's `outputSchema`); one that does
/// not still works, without. [`export_tool!`] asks with
/// `(&__output_of(&handler)).__output_schema()`: method lookup tries
/// [`__OutputSchema`] (on the type itself, where `O: JsonSchema`) before
/// [`__NoOutputSchema`] (on a reference, for any `O`).
#[doc(hidden)]
pub struct __OutputOf<O>(std::marker::PhantomData<O>);

#[doc(hidden)]
pub fn __output_of<I, O, E, F>(_handler: &F) -> __OutputOf<O>
where
    F: Fn(I) -> Result<O, E>,
{
    __OutputOf(std::marker::PhantomData)
}

#[doc(hidden)]
pub trait __OutputSchema {
    fn __output_schema(&self) -> Option<serde_json::Value>;
}

impl<O: schemars::JsonSchema> __OutputSchema for __OutputOf<O> {
    fn __output_schema(&self) -> Option<serde_json::Value> {
        // As the output is serialized (skipped and renamed fields as sent),
        // not as it would be read back.
        let generator = schemars::generate::SchemaSettings::default().for_serialize().into_generator();
        Some(generator.into_root_schema_for::<O>().to_value())
    }
}

#[doc(hidden)]
pub trait __NoOutputSchema {
    fn __output_schema(&self) -> Option<serde_json::Value>;
}

impl<O> __NoOutputSchema for &__OutputOf<O> {
    fn __output_schema(&self) -> Option<serde_json::Value> {
        None
    }
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
                #[allow(unused_imports)]
                use $crate::{__NoOutputSchema as _, __OutputSchema as _};
                #[allow(clippy::needless_borrow)]
                let output_schema = (&$crate::__output_of(&$handler)).__output_schema();
                $crate::__describe(&$handler, $name, env!("CARGO_PKG_VERSION"), $description, output_schema)
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
            serde_json::from_str(&__describe(&count, "count", "1.0.0", "Counts words.", None)).unwrap();
        assert_eq!(info["name"], "count");
        assert_eq!(info["input_schema"]["properties"]["text"]["type"], "string");
        assert_eq!(info["input_schema"]["required"][0], "text");
        assert!(info.get("output_schema").is_none());
    }

    #[derive(Serialize, schemars::JsonSchema)]
    struct Described {
        /// How many words.
        words: usize,
        /// Sent only when there are some: not required.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        long_words: Vec<String>,
    }

    fn count_described(input: Input) -> Result<Described, ToolError> {
        Ok(Described { words: input.text.split_whitespace().count(), long_words: Vec::new() })
    }

    #[test]
    fn an_output_type_with_a_schema_is_described_and_one_without_is_not() {
        // The borrows choose the method (see `__OutputOf`): they are not needless.
        #[allow(clippy::needless_borrow)]
        let with = (&__output_of(&count_described)).__output_schema().unwrap();
        assert_eq!(with["properties"]["words"]["type"], "integer");
        assert_eq!(with["required"], serde_json::json!(["words"]), "{with}");
        #[allow(clippy::needless_borrow)]
        let without = (&__output_of(&count)).__output_schema();
        assert_eq!(without, None);
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
