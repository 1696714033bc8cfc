//! A WASI command guest for the integration tests. Input on stdin:
//! `{"op": "...", ...}`; output on stdout: one JSON document.
//! Many operations are attacks: they must fail, or be stopped by the sandbox.

use std::hint::black_box;
use std::io::{Read, Write};

use serde_json::{Value, json};

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let req: Value = serde_json::from_str(&input).expect("input is JSON");
    let str_arg = |k: &str| req[k].as_str().unwrap_or_default().to_owned();
    let num_arg = |k: &str| req[k].as_u64().unwrap_or_default();
    let out = match req["op"].as_str().unwrap_or_default() {
        "echo" => json!({ "input": req, "args": std::env::args().collect::<Vec<_>>() }),
        "alloc" => {
            let n = num_arg("bytes") as usize;
            let mut v = vec![0u8; n];
            // Touch every page so the memory is really used.
            for i in (0..n).step_by(4096) {
                v[i] = 1;
            }
            json!({ "allocated": black_box(v).len() })
        }
        "spin" => loop {
            black_box(());
        },
        "work" => {
            // Bounded CPU work: `n` rounds of a cheap hash.
            let mut h: u64 = 1469598103934665603;
            for i in 0..num_arg("rounds") {
                h = black_box((h ^ i).wrapping_mul(1099511628211));
            }
            json!({ "hash": h })
        }
        // Small frames: the wasm stack overflows.
        "recurse" => json!({ "depth": recurse(black_box(1)) }),
        // Big frames: the shadow stack in linear memory overflows first.
        "recurse_big_frames" => json!({ "depth": recurse_big_frames(black_box(1)) }),
        "panic" => panic!("the probe panicked on purpose"),
        "exit" => std::process::exit(num_arg("code") as i32),
        "flood" => {
            let n = num_arg("bytes") as usize;
            let chunk = vec![b'x'; 64 * 1024];
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                out.write_all(&chunk[..k]).expect("stdout");
                err.write_all(&chunk[..k]).expect("stderr");
                left -= k;
            }
            return;
        }
        "read" => match std::fs::read_to_string(str_arg("path")) {
            Ok(content) => json!({ "ok": true, "content": content }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        "write" => match std::fs::write(str_arg("path"), str_arg("content")) {
            Ok(()) => json!({ "ok": true }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        // Appends `chunk` bytes at a time until `total` or the first error.
        "fill" => {
            use std::io::Write as _;
            let (chunk, total) = (vec![0u8; num_arg("chunk") as usize], num_arg("total"));
            let mut written = 0u64;
            let mut error = None;
            match std::fs::OpenOptions::new().create(true).append(true).open(str_arg("path")) {
                Ok(mut f) => {
                    while written < total {
                        if let Err(e) = f.write_all(&chunk) {
                            error = Some(e.to_string());
                            break;
                        }
                        written += chunk.len() as u64;
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
            json!({ "written": written, "error": error })
        }
        // `count` files of `bytes` each in `dir`.
        "files" => {
            let content = vec![7u8; num_arg("bytes") as usize];
            let dir = str_arg("dir");
            let made =
                (0..num_arg("count")).take_while(|i| std::fs::write(format!("{dir}/f{i}"), &content).is_ok()).count();
            json!({ "made": made })
        }
        "list" => match std::fs::read_dir(str_arg("path")) {
            Ok(entries) => {
                let mut names: Vec<String> =
                    entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                names.sort();
                json!({ "ok": true, "entries": names })
            }
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        "env" => json!({
            "vars": std::env::vars().collect::<Vec<_>>(),
            "cwd": std::env::current_dir().map(|p| p.display().to_string()).ok(),
        }),
        "connect" => match std::net::TcpStream::connect(str_arg("addr")) {
            Ok(_) => json!({ "ok": true }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(num_arg("ms")));
            json!({ "slept_ms": num_arg("ms") })
        }
        other => {
            eprintln!("unknown op {other:?}");
            std::process::exit(3);
        }
    };
    println!("{out}");
}

#[inline(never)]
fn recurse(n: u64) -> u64 {
    if black_box(n) == 0 { 0 } else { black_box(recurse(n + 1)) ^ n }
}

#[inline(never)]
fn recurse_big_frames(n: u64) -> u64 {
    let pad = black_box([n; 64]);
    if black_box(n) == 0 { pad[3] } else { recurse_big_frames(n + 1) + pad[7] }
}
