//! Issue 9, items 1 and 4: every byte the gateway holds for a client is charged to the memory
//! budget and to that client's share of it (`[client_shares] memory_percent`), so one client
//! cannot fill the budget and make another client's job lose its outputs or its upload.
//! Real daemons over real TLS; each test has its own stack (`config(230 + k, ..)`).

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use sandrun_tests::config;
use sandrun_tests::stack::{Part, Stack};

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A budget of 24 MiB: one client's share (25 %) is 6 MiB.
const BUDGET_BYTES: u64 = 24 << 20;
const SHARE_BYTES: u64 = BUDGET_BYTES / 4;

fn stack(k: u32, retention: &str) -> Stack {
    let gateway = format!(
        "[retention]\nmemory_budget_bytes = {BUDGET_BYTES}\nfailed_ttl_s = 3600\n{retention}"
    );
    Stack::start(&config(230 + k, ""), &gateway)
}

/// A `/bin/sh` job: `run.sh` holding `script`, returning `out/`.
fn sh_job(script: &str) -> Vec<Part> {
    let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "timeout": 60,
                          "outputs": ["out/"]});
    vec![Part::file("run.sh", script), Part::manifest(&manifest)]
}

fn submit_from(stack: &Stack, from: Ipv4Addr, parts: &[Part]) -> String {
    let r = stack.submit_from(from, parts);
    assert_eq!(r.status, 200, "submit from {from} refused: {}", r.text());
    r.json()["job_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no job_id in {}", r.text()))
}

fn stats_from(stack: &Stack, from: Ipv4Addr) -> Value {
    let r = stack.curl_from(from, &[], "/stats");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Each attacker job writes seven outputs of 1 MiB + 4 KiB (within the helper's 8 MiB output
/// cap): four such jobs (28 files) are more than the whole 24 MiB budget, and the old gateway
/// kept 23 of them, leaving less than 1 MiB for anyone else for the results' whole TTL.
#[test]
fn given_one_client_filling_the_result_budget_then_another_client_still_gets_its_1_mib_output() {
    sandrun_tests::require_root();
    let stack = stack(0, "");
    let big = "mkdir -p out; for i in 1 2 3 4 5 6 7; do head -c 1052672 /dev/zero > out/f$i; done";
    let ids: Vec<String> = (0..4)
        .map(|_| submit_from(&stack, ATTACKER, &sh_job(big)))
        .collect();
    let mut kept = 0u64;
    let mut skipped = 0usize;
    for id in &ids {
        let status = stack.wait_finished(id);
        assert_eq!(status["status"], "completed", "{status}");
        kept += status["output_files"].as_object().map_or(0, |o| {
            o.values()
                .map(|f| f["size_bytes"].as_u64().unwrap_or(0))
                .sum()
        });
        skipped += status["skipped_outputs"].as_array().map_or(0, Vec::len);
    }
    let attacker = stats_from(&stack, ATTACKER);
    eprintln!("attacker kept {kept} bytes of outputs, {skipped} skipped; stats {attacker}");
    assert!(
        kept <= SHARE_BYTES,
        "the attacker holds {kept} bytes of results"
    );
    assert!(
        skipped > 0,
        "the attacker's outputs past its share are listed as skipped"
    );
    let held = attacker["memory"]["used_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        held >= kept && held <= SHARE_BYTES,
        "the attacker's charge is {held}: {attacker}"
    );

    let small = "mkdir -p out; head -c 1048576 /dev/urandom > out/b";
    let id = submit_from(&stack, BYSTANDER, &sh_job(small));
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(
        status["output_files"]["out/b"]["size_bytes"], 1_048_576,
        "the bystander's output is returned: {status}"
    );
    assert_eq!(status["skipped_outputs"], json!([]), "{status}");
    let file = stack.curl_from(BYSTANDER, &[], &format!("/download/{id}/out/b"));
    assert_eq!((file.status, file.body.len()), (200, 1_048_576));
}
