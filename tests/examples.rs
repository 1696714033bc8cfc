//! The example tools in `examples/`, built with the SDK, run through the engine.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use common::{call, load, run, sandbox};
use imagentx_sandbox::report::Status;
use serde_json::json;

#[tokio::test]
async fn word_stats_counts_a_text() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "word-stats").await;
    assert_eq!(tool.name(), "word-stats");
    assert!(tool.info().input_schema.as_ref().unwrap()["properties"]["text"].is_object());
    // Its output type derives JsonSchema: the SDK describes it too.
    let output = tool.info().output_schema.as_ref().unwrap();
    assert_eq!(output["properties"]["sentences"]["type"], "integer", "{output}");
    let text = "The cat sat. The cat ran!\nA dog? The end";
    let report = run(&sb, &tool, &call("alice", "free", json!({"text": text, "top": 2}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    let out = report.output.unwrap();
    assert_eq!(out["words"], 10);
    assert_eq!(out["lines"], 2);
    assert_eq!(out["sentences"], 4);
    assert_eq!(out["top_words"], json!([{"word": "the", "count": 3}, {"word": "cat", "count": 2}]));
    let report = run(&sb, &tool, &call("alice", "free", json!({"text": "x", "top": 1000}))).await;
    assert_eq!(report.status, Status::InvalidInput);
}

#[tokio::test]
async fn notes_keeps_state_in_data_between_calls() {
    let (sb, dir) = sandbox();
    let tool = load(&sb, "notes").await;
    // Its output type has no JsonSchema: described without an output schema.
    assert_eq!(tool.info().output_schema, None);
    let add =
        |title: &str, tags: &[&str]| call("alice", "free", json!({"action": "add", "title": title, "tags": tags}));
    for (title, tags) in [("Buy milk", &["home"][..]), ("Call Bob", &["work"]), ("Milk the goat", &["farm"])] {
        let report = run(&sb, &tool, &add(title, tags)).await;
        assert_eq!(report.status, Status::Ok, "{report:?}");
    }
    let report = run(&sb, &tool, &call("alice", "free", json!({"action": "search", "query": "MILK"}))).await;
    let titles: Vec<_> =
        report.output.unwrap()["notes"].as_array().unwrap().iter().map(|n| n["title"].clone()).collect();
    assert_eq!(titles, [json!("Buy milk"), json!("Milk the goat")]);

    let report = run(&sb, &tool, &call("alice", "free", json!({"action": "delete", "id": 1}))).await;
    assert_eq!(report.output.unwrap()["deleted"], 1);
    let report = run(&sb, &tool, &call("alice", "free", json!({"action": "list", "tag": null}))).await;
    assert_eq!(report.output.unwrap()["notes"].as_array().unwrap().len(), 2);
    assert!(dir.path().join("users/alice/notes.json").is_file());

    // Bob's notebook is his own.
    let report = run(&sb, &tool, &call("bob", "free", json!({"action": "list", "tag": null}))).await;
    assert_eq!(report.output.unwrap()["notes"], json!([]));
    let report = run(&sb, &tool, &call("bob", "free", json!({"action": "delete", "id": 2}))).await;
    assert_eq!(report.status, Status::ToolError);
}

#[tokio::test]
async fn csv_stats_summarises_inline_and_data_dir_tables() {
    let (sb, dir) = sandbox();
    let tool = load(&sb, "csv-stats").await;
    let csv = "city,temp\nOslo,3\nRome,18\nOslo,5\nLima,\n";
    let report = run(&sb, &tool, &call("alice", "free", json!({"csv": csv}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    let out = report.output.unwrap();
    assert_eq!(out["rows"], 4);
    assert_eq!(out["columns"][0]["distinct"], 3);
    assert_eq!(out["columns"][0]["most_common"][0], json!(["Oslo", 2]));
    let temp = &out["columns"][1];
    assert_eq!((temp["count"].clone(), temp["numeric"]["median"].clone()), (json!(3), json!(5.0)));
    assert_eq!(temp["numeric"]["max"], 18.0);

    // A larger file the user put in their directory.
    let users = dir.path().join("users/alice");
    let mut big = String::from("n,sq\n");
    for i in 1..=10_000 {
        big.push_str(&format!("{i},{}\n", i * i));
    }
    std::fs::write(users.join("squares.csv"), big).unwrap();
    let report = run(&sb, &tool, &call("alice", "free", json!({"path": "squares.csv"}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    let out = report.output.unwrap();
    assert_eq!(out["rows"], 10_000);
    assert_eq!(out["columns"][0]["numeric"]["mean"], 5000.5);

    let report = run(&sb, &tool, &call("alice", "free", json!({"path": "../bob/x.csv"}))).await;
    assert_eq!(report.status, Status::ToolError, "{report:?}");
    let report = run(&sb, &tool, &call("alice", "free", json!({}))).await;
    assert_eq!(report.status, Status::InvalidInput);
}
