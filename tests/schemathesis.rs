//! The HTTP API against requests generated from its own OpenAPI document by
//! schemathesis (PyPI, in `target/schemathesis-venv`), as an admin, on a
//! real server: no 5xx, answers that match the document (statuses, content
//! types, bodies), invalid requests refused. Left out: `POST /v1/tools`,
//! whose body is a WASM module schemathesis cannot make. Strings are
//! generated as UTF-8 (`--generation-codec utf-8`): a lone UTF-16 surrogate
//! (`"\ud800"`) is JSON that no UTF-8 string can hold, and the server
//! refuses it. With that, `positive_data_acceptance` holds too: every
//! request the document calls valid is accepted (it found `9909.0` refused
//! for an integer, an empty body accepted by the document where a field is
//! required, and bounds that live in the policy missing from it).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::process::Command;

use server::TestServer;

const SCHEMATHESIS: &str = "schemathesis==4.32.5";

#[tokio::test(flavor = "multi_thread")]
async fn the_api_holds_against_schemathesis() {
    let python = common::venv_python("schemathesis-venv", SCHEMATHESIS);
    let st = python.with_file_name("st");
    let srv = TestServer::start().await;
    srv.register("probe", "probe").await;
    srv.add_user("alice", "standard", false).await;
    let mut run = Command::new(st);
    run.args(["run", &format!("http://{}/openapi.json", srv.addr)])
        .args(["--header", &format!("Authorization: Bearer {}", srv.admin)])
        .args(["--checks", "all", "--generation-codec", "utf-8"])
        .args(["--exclude-operation-id", "post_v1_tools"])
        .args(["--max-examples", "20", "--seed", "1", "--request-timeout", "30", "--no-color"]);
    let ran = tokio::task::spawn_blocking(move || run.output()).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&ran.stdout).into_owned() + &String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "schemathesis found failures:\n{out}");
    assert!(out.contains(" passed"), "{out}");
    srv.assert_healthy().await;
}
