//! The official Python SDKs (pinned in scripts/tools-requirements.txt) against the simulator:
//! our wire format checked by clients we did not write.

use std::path::PathBuf;
use std::time::Duration;

use rowsmith_shared::config::SimSettings;
use tokio_util::sync::CancellationToken;

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/bootstrap",
        venv.display()
    );
    venv
}

async fn run_check(script: &str, base_url: String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .arg(&base_url)
            .output(),
    )
    .await
    .expect("the SDK check finished in time")
    .expect("run python");
    assert!(
        output.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn start_sim() -> (std::net::SocketAddr, CancellationToken) {
    let settings = SimSettings {
        listen: "127.0.0.1:0".into(),
        rows_per_second: 1000.0,
        validating: Duration::from_millis(50),
        finalizing: Duration::from_millis(50),
        ..SimSettings::default()
    };
    let shutdown = CancellationToken::new();
    let (address, _) = rowsmith_provider_sim::start(settings, shutdown.clone())
        .await
        .expect("sim");
    (address, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_against_the_simulator() {
    let (address, shutdown) = start_sim().await;
    run_check("check_openai.py", format!("http://{address}/v1")).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_against_the_simulator() {
    let (address, shutdown) = start_sim().await;
    run_check("check_anthropic.py", format!("http://{address}")).await;
    shutdown.cancel();
}
