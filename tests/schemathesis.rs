//! The HTTP API against requests generated from its own OpenAPI document by
//! schemathesis (PyPI, in `target/schemathesis-venv`), as an admin, on a
//! real server: no 5xx, answers that match the document (statuses, content
//! types, bodies), invalid requests refused. Left out: `POST /v1/tools`,
//! whose body is a WASM module schemathesis cannot make, and the
//! `positive_data_acceptance` check, which counts as valid what the server
//! rightly refuses (`9909.0` for an integer, lone UTF-16 surrogates, a
//! timeout over the caller's tier's maximum).

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
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--exclude-operation-id", "post_v1_tools"])
        .args(["--max-examples", "20", "--seed", "1", "--request-timeout", "30", "--no-color"]);
    let ran = tokio::task::spawn_blocking(move || run.output()).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&ran.stdout).into_owned() + &String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "schemathesis found failures:\n{out}");
    assert!(out.contains(" passed"), "{out}");
    srv.assert_healthy().await;
}
