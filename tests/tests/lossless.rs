//! No accepted job is ever lost (issue 9, item 6), on a real stack: a flood from 30 source
//! addresses against a helper with two slots, in which every job the gateway accepted with 200
//! completes (none ends `internal`) and the helper never answers `Busy`; every environment name
//! the helper refuses is refused at `/submit` with 400; one address past its share of the queue
//! gets 429 while another address is still accepted; with one slot, a job submitted right after
//! the previous one's `Done` is never `Busy`. Each test has its own stack
//! (`config(..)`, from the allocator).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::json;

use sandrun_ipc::ErrorCode;
use sandrun_tests::hostile::helper_stats;
use sandrun_tests::stack::{Part, Stack};
use sandrun_tests::{config, Helper, Job};

/// Source addresses of the flood, and submissions from each.
const ADDRESSES: u8 = 30;
const PER_ADDRESS: usize = 10;

fn sh_job(script: &str) -> Vec<Part> {
    let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "timeout": 300});
    vec![Part::file("run.sh", script), Part::manifest(&manifest)]
}

/// `127.0.0.{2 + i}`: another client for the gateway.
fn address(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i)
}

#[test]
fn given_a_flood_from_30_addresses_then_every_accepted_job_completes_and_the_helper_is_never_busy()
{
    sandrun_tests::require_root();
    // As many jobs in flight as the helper has slots: the helper may only say Busy if it counts
    // a slot that is being torn down after `Done`.
    let stack = Stack::start(
        &config("max_concurrent = 2\n"),
        "max_running = 2\nqueue_capacity = 64\n",
    );
    let answers: Vec<(u8, u16, serde_json::Value)> = std::thread::scope(|s| {
        let stack = &stack;
        let threads: Vec<_> = (0..ADDRESSES)
            .map(|a| {
                s.spawn(move || {
                    (0..PER_ADDRESS)
                        .map(|i| {
                            let r =
                                stack.submit_from(address(a), &sh_job(&format!("echo {a}-{i}")));
                            (a, r.status, r.json())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a submitting thread panicked"))
            .collect()
    });
    let mut refused: BTreeMap<u16, usize> = BTreeMap::new();
    let mut accepted = Vec::new();
    for (a, status, body) in &answers {
        match status {
            200 => accepted.push((*a, body["job_id"].as_str().expect("job_id").to_owned())),
            429 | 503 => {
                assert!(
                    body["error"].as_str().is_some(),
                    "refusal without error: {body}"
                );
                *refused.entry(*status).or_default() += 1;
            }
            other => panic!("unexpected answer {other} to a submission: {body}"),
        }
    }
    assert!(
        accepted.len() >= 64,
        "the flood filled the queue at least once: {} accepted, refused {refused:?}",
        accepted.len()
    );
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut lost = Vec::new();
    for (a, id) in &accepted {
        let status = stack.wait_finished(id);
        let outcome = format!("{}/{}", status["status"], status["reason"]);
        *by_outcome.entry(outcome).or_default() += 1;
        if status["status"] != "completed" {
            lost.push((address(*a), status));
        }
    }
    eprintln!(
        "flood: {} submissions, {} accepted, refused {refused:?}, outcomes {by_outcome:?}",
        answers.len(),
        accepted.len()
    );
    assert!(
        lost.is_empty(),
        "accepted jobs that did not complete: {lost:#?}"
    );
    let stats = helper_stats(stack.helper());
    assert_eq!(
        stats.refused_busy, 0,
        "the helper said Busy to a gateway within its slots: {stats:?}"
    );
}

#[test]
fn given_every_env_name_the_helper_refuses_then_submit_answers_400_and_nothing_runs() {
    sandrun_tests::require_root();
    let stack = Stack::start(&config(""), "");
    let names = sandrun_ipc::rules::RESERVED_ENV
        .iter()
        .map(|n| (*n).to_owned())
        .chain(["LD_PRELOAD".to_owned(), "LD_AUDIT".to_owned()]);
    for name in names {
        let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "env": {&name: "x"}});
        let parts = [Part::file("run.sh", "echo ran"), Part::manifest(&manifest)];
        let r = stack.submit(&parts);
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert_eq!(r.status, 400, "env {name} was accepted: {}", r.text());
        assert!(error.contains(&format!("env.{name}")), "{name}: {error}");
    }
    let stats = helper_stats(stack.helper());
    assert_eq!(
        stats.jobs_started, 0,
        "a refused job reached the helper: {stats:?}"
    );
    // An ordinary name still reaches the job.
    let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "env": {"GREETING": "hi"}});
    let id = stack.submit_ok(&[
        Part::file("run.sh", "echo $GREETING"),
        Part::manifest(&manifest),
    ]);
    assert_eq!(stack.wait_finished(&id)["status"], "completed");
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(logs["stdout"], "hi\n", "{logs}");
}

#[test]
fn given_one_address_past_its_queue_share_then_429_while_another_address_is_accepted() {
    sandrun_tests::require_root();
    // 8 positions at 25 %: one client may hold 2 of them.
    let stack = Stack::start(
        &config("max_concurrent = 1\n"),
        "max_running = 1\nqueue_capacity = 8\n[client_shares]\nqueue_percent = 25\n",
    );
    let flood = address(0);
    let running = stack.submit_from(flood, &sh_job("sleep 300"));
    assert_eq!(running.status, 200, "{}", running.text());
    let running = running.json()["job_id"]
        .as_str()
        .expect("job_id")
        .to_owned();
    stack.wait_status(&running, |s| s != "queued");
    for i in 0..2 {
        let r = stack.submit_from(flood, &sh_job(&format!("echo {i}")));
        assert_eq!(r.status, 200, "within the share: {}", r.text());
    }
    let r = stack.submit_from(flood, &sh_job("echo past the share"));
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert_eq!(r.status, 429, "past the share: {}", r.text());
    assert!(error.contains("queue share"), "{error}");
    assert!(r.header("retry-after").is_some(), "{}", r.headers);

    let bystander = stack.submit_from(address(1), &sh_job("echo bystander"));
    assert_eq!(bystander.status, 200, "{}", bystander.text());
    let bystander = bystander.json()["job_id"]
        .as_str()
        .expect("job_id")
        .to_owned();
    let cancel = stack.delete(&format!("/jobs/{running}"));
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    let status = stack.wait_finished(&bystander);
    assert_eq!(status["status"], "completed", "{status}");
}

#[test]
fn given_one_slot_when_each_job_is_submitted_right_after_the_previous_done_then_none_is_busy() {
    sandrun_tests::require_root();
    // The gateway's pattern with `max_running = max_concurrent`: `Done`, then at once the next
    // `Submit`. The previous job may still be tearing down (C exiting, cgroup removal); that
    // must not count against the one slot.
    let helper = Helper::start(&config("max_concurrent = 1\n"));
    let mut busy = 0;
    for i in 0..100 {
        let out = helper.run(&Job::new(&["/bin/echo", &i.to_string()]));
        match out.error.as_ref().map(|e| e.code) {
            Some(ErrorCode::Busy) => busy += 1,
            None => assert_eq!(
                out.stdout,
                format!("{i}\n").as_bytes(),
                "{}",
                out.describe()
            ),
            Some(other) => panic!("job {i} refused with {other:?}: {}", out.describe()),
        }
    }
    let stats = helper_stats(&helper);
    assert_eq!(busy, 0, "Busy right after Done: {stats:?}");
    assert_eq!(stats.jobs_started, 100, "{stats:?}");
}
