//! The signed result message of `docs/signatures.md`, rebuilt from a job's `/status` alone, so a
//! test can check the gateway's signature with an independent tool (`Stack::openssl_verifies`).

use serde_json::Value;

/// The message of format `domain` (`sandrun-result-v1`, `-v2`, `-v3`): the header, the format's
/// own lines (`format_lines`, each ending in `\n`; empty for v1), then the fields every format
/// signs and one `output=` line per output, sorted by the bytes of its path.
pub fn result_message(status: &Value, domain: &str, format_lines: &str) -> String {
    let meta = &status["execution_metadata"];
    let exit_code = meta["exit_code"]
        .as_i64()
        .map_or("none".to_owned(), |c| c.to_string());
    let mut outputs: Vec<(String, String)> = status["output_files"]
        .as_object()
        .expect("output_files is an object")
        .iter()
        .map(|(p, i)| (p.clone(), i["sha256"].as_str().expect("sha256").to_owned()))
        .collect();
    outputs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut msg = format!(
        "{domain}\njob_id={}\njob_hash={}\n{format_lines}exit_code={exit_code}\ncpu_ms={}\n\
         memory_peak_bytes={}\ncompleted_at={}\noutputs={}\n",
        status["job_id"].as_str().expect("job_id"),
        status["job_hash"].as_str().expect("job_hash"),
        status["cpu_ms"].as_u64().expect("cpu_ms"),
        meta["memory_peak_bytes"]
            .as_u64()
            .expect("memory_peak_bytes"),
        status["completed_at"].as_u64().expect("completed_at"),
        outputs.len(),
    );
    for (path, sha) in outputs {
        msg.push_str(&format!("output={sha} {path}\n"));
    }
    msg
}
