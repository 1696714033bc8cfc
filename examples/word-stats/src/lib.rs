//! `word-stats`: counts of a text and its most frequent words.

use std::collections::HashMap;

use imagentx_tool::ToolError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
struct Input {
    /// The text to analyse.
    text: String,
    /// How many of the most frequent words to list (default 5, at most 100).
    #[serde(default = "default_top")]
    top: usize,
}

fn default_top() -> usize {
    5
}

/// What the text holds (its JSON Schema is the tool's `outputSchema` over MCP).
#[derive(Serialize, JsonSchema)]
struct Output {
    words: usize,
    unique_words: usize,
    lines: usize,
    sentences: usize,
    characters: usize,
    bytes: usize,
    top_words: Vec<WordCount>,
}

#[derive(Serialize, JsonSchema)]
struct WordCount {
    word: String,
    count: usize,
}

fn word_stats(input: Input) -> Result<Output, ToolError> {
    if input.top > 100 {
        return Err(ToolError::invalid_input("top must be at most 100"));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut words = 0;
    for word in input.text.split_whitespace() {
        let word: String =
            word.trim_matches(|c: char| !c.is_alphanumeric()).chars().flat_map(char::to_lowercase).collect();
        if !word.is_empty() {
            words += 1;
            *counts.entry(word).or_default() += 1;
        }
    }
    let mut top_words: Vec<WordCount> = counts.iter().map(|(w, &c)| WordCount { word: w.clone(), count: c }).collect();
    top_words.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.word.cmp(&b.word)));
    top_words.truncate(input.top);
    Ok(Output {
        words,
        unique_words: counts.len(),
        lines: input.text.lines().count(),
        sentences: input.text.split(['.', '!', '?']).filter(|s| s.chars().any(char::is_alphanumeric)).count(),
        characters: input.text.chars().count(),
        bytes: input.text.len(),
        top_words,
    })
}

imagentx_tool::export_tool!(word_stats);
