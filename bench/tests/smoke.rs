//! `orchestrator-bench all --smoke`: every benchmark of the suite runs end to end at a tiny
//! size against the `orchestrator` binary of this build, checks what it checks (every job
//! exactly once, every delivery stored once, the cap), and prints its table. The figures
//! mean nothing at that size; that the suite works does.
//!
//! Needs PostgreSQL's binaries (else `SKIPPED`, a failure with `ORCH_REQUIRE_POSTGRES`) and,
//! for graphile-worker's side, Node.js and npm (else that side is left out, `SKIPPED`).

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/orchestrator`, built by the same `cargo test` for the root package's
/// own tests (cargo builds every target before it runs any test).
fn orchestrator_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_orchestrator-bench"));
    bench.with_file_name("orchestrator")
}

fn works(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_benchmark_runs_at_a_tiny_size() {
    const NAME: &str = "smoke::every_benchmark_runs_at_a_tiny_size";
    if let Err(why) = orchestrator_testkit::durable_cluster() {
        orchestrator_testkit::skip(NAME, &why);
        return;
    }
    let bin = orchestrator_bin();
    assert!(
        bin.is_file(),
        "{} is missing: this test runs with the whole workspace (`cargo test --workspace`, \
         as scripts/test does), or after `cargo build -p orchestrator`",
        bin.display()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator-bench"));
    cmd.arg("--bin").arg(&bin).args(["all", "--smoke"]);
    let graphile = works("node") && works("npm");
    if !graphile {
        eprintln!("SKIPPED {NAME} (graphile-worker's side only): Node.js or npm is missing");
        cmd.arg("--no-graphile");
    }
    let out = cmd.output().expect("the bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the suite failed:\n{stdout}\n{stderr}"
    );
    let table = stdout
        .split("## orchestrator-bench all")
        .nth(1)
        .unwrap_or_else(|| panic!("no table:\n{stdout}"));
    for figure in [
        "start-up of `orchestrator up`",
        "`RecordRun` over gRPC",
        "no-op jobs/s, launcher, reserved jobs",
        "no-op jobs/s, launcher, LLM jobs",
        "dispatch latency",
        "reaper tick with N running jobs",
        "webhook ingest, open loop",
        "every delivery stored and applied once",
        "RSS of `orchestrator serve launcher`",
        "RSS of `orchestrator up`",
        "exactly-once: 4 launcher processes",
    ] {
        assert!(
            table.contains(figure),
            "the table lacks '{figure}':\n{table}"
        );
    }
    if graphile {
        for figure in [
            "graphile-worker 0.17.3, default",
            "ratio launcher (reserved) / graphile-worker",
        ] {
            assert!(
                table.contains(figure),
                "the table lacks '{figure}':\n{table}"
            );
        }
    }
    assert!(!table.contains("FAILED"), "{table}");
    assert!(
        table.contains("ran exactly once"),
        "exactly-once must say so:\n{table}"
    );
}
