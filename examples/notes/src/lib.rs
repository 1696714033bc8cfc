//! `notes`: a small notebook kept in the user's `/data/notes.json`, so it
//! survives between calls (each call is a fresh instance).

use imagentx_tool::ToolError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const STORE: &str = "/data/notes.json";
const STORE_TMP: &str = "/data/.notes.json.tmp";

#[derive(Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Input {
    /// Add a note.
    Add {
        title: String,
        #[serde(default)]
        body: String,
        #[serde(default)]
        tags: Vec<String>,
    },
    /// List all notes, newest first (optionally only those with a tag).
    List { tag: Option<String> },
    /// Find notes whose title, body or tags contain the query (case-insensitive).
    Search { query: String },
    /// Delete a note by id.
    Delete { id: u64 },
}

#[derive(Serialize, Deserialize, Clone)]
struct Note {
    id: u64,
    title: String,
    body: String,
    tags: Vec<String>,
}

#[derive(Serialize, Deserialize, Default)]
struct Notebook {
    next_id: u64,
    notes: Vec<Note>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Added { added: Note },
    Found { notes: Vec<Note> },
    Deleted { deleted: u64 },
}

fn load() -> Result<Notebook, ToolError> {
    match std::fs::read(STORE) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Notebook::default()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the notebook whole, then renames it into place: a call stopped midway
/// never leaves a half-written notebook.
fn save(book: &Notebook) -> Result<(), ToolError> {
    std::fs::write(STORE_TMP, serde_json::to_vec(book)?)?;
    std::fs::rename(STORE_TMP, STORE)?;
    Ok(())
}

fn notes(input: Input) -> Result<Output, ToolError> {
    let mut book = load()?;
    match input {
        Input::Add { title, body, tags } => {
            if title.trim().is_empty() {
                return Err(ToolError::invalid_input("a note needs a title"));
            }
            book.next_id += 1;
            let note = Note { id: book.next_id, title, body, tags };
            book.notes.push(note.clone());
            save(&book)?;
            Ok(Output::Added { added: note })
        }
        Input::List { tag } => {
            let mut notes: Vec<Note> =
                book.notes.into_iter().filter(|n| tag.as_ref().is_none_or(|t| n.tags.contains(t))).collect();
            notes.reverse();
            Ok(Output::Found { notes })
        }
        Input::Search { query } => {
            let q = query.to_lowercase();
            let hit = |n: &Note| {
                n.title.to_lowercase().contains(&q)
                    || n.body.to_lowercase().contains(&q)
                    || n.tags.iter().any(|t| t.to_lowercase().contains(&q))
            };
            Ok(Output::Found { notes: book.notes.into_iter().filter(hit).collect() })
        }
        Input::Delete { id } => {
            let before = book.notes.len();
            book.notes.retain(|n| n.id != id);
            if book.notes.len() == before {
                return Err(ToolError::new(format!("no note with id {id}")));
            }
            save(&book)?;
            Ok(Output::Deleted { deleted: id })
        }
    }
}

imagentx_tool::export_tool!(notes);
