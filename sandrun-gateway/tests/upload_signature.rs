//! Job hash and signed results, checked with a tool that is not sandrun (`openssl`), exactly as
//! `docs/signatures.md` tells clients to.

mod upload_support;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use sandrun_gateway::signing::{canonical_message, job_hash, ResultClaim, WorkerKey};
use sha2::{Digest, Sha256};
use upload_support::*;

fn openssl_verify(dir: &Path, msg: &[u8], sig: &[u8]) -> bool {
    std::fs::write(dir.join("msg"), msg).unwrap();
    std::fs::write(dir.join("sig.bin"), sig).unwrap();
    let status = Command::new("openssl")
        .args([
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
        ])
        .args(["-in", "msg", "-sigfile", "sig.bin"])
        .current_dir(dir)
        .output()
        .expect("openssl must be installed to run this test");
    status.status.success()
}

#[tokio::test]
async fn given_a_signed_result_then_openssl_verifies_it_and_rejects_a_flipped_byte() {
    let s = submit(&[("files", Some("main.py"), b"print(42)")])
        .await
        .unwrap();
    let outputs = vec![
        (
            "plots/b.png".to_owned(),
            <[u8; 32]>::from(Sha256::digest(b"png")),
        ),
        (
            "a.txt".to_owned(),
            <[u8; 32]>::from(Sha256::digest(b"42\n")),
        ),
    ];
    let claim = ResultClaim {
        job_id: "5f0c2a9e4b7d41c8a3e6f1b2c9d8e7a6",
        job_hash: &s.job_hash,
        exit_code: Some(0),
        cpu_ms: 18,
        memory_peak_bytes: 9_437_184,
        outputs: &outputs,
        completed_at: 1_750_000_000,
        environment: None,
        requirements: None,
    };
    let key = WorkerKey::generate();
    let msg = canonical_message(&claim);
    let sig = base64::engine::general_purpose::STANDARD
        .decode(key.sign(&msg))
        .unwrap();
    assert_eq!(sig.len(), 64);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.pem"), key.public_key_pem()).unwrap();
    assert!(
        openssl_verify(dir.path(), &msg, &sig),
        "openssl rejected a valid signature"
    );

    let mut tampered = msg.clone();
    let at = tampered.iter().position(|&b| b == b'=').unwrap() + 1;
    tampered[at] ^= 1;
    assert!(
        !openssl_verify(dir.path(), &tampered, &sig),
        "openssl accepted a changed message"
    );
    let mut bad_sig = sig.clone();
    bad_sig[10] ^= 0x80;
    assert!(
        !openssl_verify(dir.path(), &msg, &bad_sig),
        "openssl accepted a changed signature"
    );
}

#[tokio::test]
async fn given_a_saved_key_then_openssl_derives_the_same_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = WorkerKey::generate();
    key.save(dir.path().join("worker.pem")).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-in", "worker.pem", "-pubout"])
        .current_dir(dir.path())
        .output()
        .expect("openssl must be installed to run this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), key.public_key_pem());
}

#[tokio::test]
async fn given_a_change_to_any_input_file_then_the_job_hash_changes() {
    let base = [
        ("files", Some("main.py"), &b"import lib"[..]),
        ("files", Some("lib.py"), b"x=1"),
    ];
    let a = submit(&base).await.unwrap();
    let same = submit(&[base[1], base[0]]).await.unwrap();
    assert_eq!(a.job_hash, same.job_hash, "part order must not matter");
    let changed_lib = submit(&[base[0], ("files", Some("lib.py"), b"x=2")])
        .await
        .unwrap();
    assert_ne!(
        a.job_hash, changed_lib.job_hash,
        "a non-entrypoint file is hashed"
    );
    let renamed = submit(&[base[0], ("files", Some("lib2.py"), b"x=1")])
        .await
        .unwrap();
    assert_ne!(a.job_hash, renamed.job_hash, "paths are hashed");
    let manifest = submit(&[base[0], base[1], ("manifest", None, br#"{"timeout":301}"#)])
        .await
        .unwrap();
    assert_ne!(a.job_hash, manifest.job_hash, "the manifest is hashed");
}

#[tokio::test]
async fn given_the_documented_recipe_then_a_client_rebuilds_the_job_hash() {
    let s = submit(&[
        ("files", Some("main.py"), b"print(1)"),
        ("files", Some("d/x"), b"X"),
    ])
    .await
    .unwrap();
    let json = s.manifest.canonical_json();
    let mut text = format!("sandrun-job-v1\nmanifest {}\n", json.len()).into_bytes();
    text.extend_from_slice(&json);
    text.extend_from_slice(b"\nfiles 2\n");
    for (path, data) in [("d/x", &b"X"[..]), ("main.py", b"print(1)")] {
        text.extend_from_slice(
            format!("file {} {path}\n", hex::encode(Sha256::digest(data))).as_bytes(),
        );
    }
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&text)), s.job_hash);
    assert_eq!(job_hash(&s.manifest, &s.bundle, &s.stdin), s.job_hash);
}

#[test]
fn given_a_key_generated_by_openssl_then_the_gateway_loads_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out", "k.pem"])
        .current_dir(dir.path())
        .output()
        .expect("openssl must be installed to run this test");
    assert!(out.status.success());
    let path = dir.path().join("k.pem");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = WorkerKey::load(&path).unwrap();
    let public = Command::new("openssl")
        .args(["pkey", "-in", "k.pem", "-pubout"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(public.stdout).unwrap(),
        key.public_key_pem()
    );
}
