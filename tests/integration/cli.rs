//! The binary as an operator runs it.

use std::process::Command;

fn switchyard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = switchyard(&["check", "-c", path.to_str().expect("utf-8 path")]);
            assert_eq!(code, 0, "{}: {err}", path.display());
            assert!(out.contains(": ok: "), "{out}");
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} configs found");
}

/// The configs in deploy/, the one inside the Kubernetes ConfigMap included, pass `check`,
/// and what the compose file and the Dockerfile name exists.
#[test]
fn the_deploy_examples_are_consistent() {
    let root = env!("CARGO_MANIFEST_DIR");
    let check = |path: &str| {
        let (code, out, err) = switchyard(&["check", "-c", path]);
        assert_eq!(code, 0, "{path}: {err}");
        assert!(out.contains(": ok: "), "{out}");
    };
    check(&format!("{root}/deploy/compose/switchyard.toml"));
    check(&format!("{root}/deploy/systemd/switchyard.toml"));

    let manifest = std::fs::read_to_string(format!("{root}/deploy/kubernetes/switchyard.yaml")).expect("manifest");
    let embedded: String = manifest
        .split_once("switchyard.toml: |\n")
        .expect("a ConfigMap with switchyard.toml")
        .1
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let dir = std::env::temp_dir().join(format!("switchyard-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let extracted = dir.join("configmap.toml");
    std::fs::write(&extracted, embedded).expect("write");
    check(extracted.to_str().expect("utf-8"));
    let _ = std::fs::remove_dir_all(&dir);

    // The agents' fixed addresses in the compose file are the servers switchyard sends to.
    let compose = std::fs::read_to_string(format!("{root}/deploy/compose/docker-compose.yml")).expect("compose");
    let config = std::fs::read_to_string(format!("{root}/deploy/compose/switchyard.toml")).expect("config");
    for agent in ["172.28.0.11", "172.28.0.12"] {
        assert!(compose.contains(&format!("ipv4_address: {agent}")), "{agent} in the compose file");
        assert!(config.contains(&format!("\"{agent}:80\"")), "{agent} in switchyard.toml");
    }
    let dockerfile = std::fs::read_to_string(format!("{root}/deploy/Dockerfile")).expect("Dockerfile");
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(std::path::Path::new(root).join(source).exists(), "{line}: {source} is not in the repository");
        }
    }
}

#[test]
fn check_lists_every_error_with_its_line_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[backends.blue]\nservers = [\"not-an-address\"]\n\n[[routes]]\nname = \"agent\"\nsplit = { blue = 60, ghost = 30 }\n",
    )
    .expect("write");
    let (code, out, err) = switchyard(&["check", "-c", file.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert!(err.contains("bad.toml:2:12: backends.blue.servers[0]: \"not-an-address\" is not an address"), "{err}");
    assert!(err.contains("bad.toml:6:9: routes[0].split: shares sum to 90 %"), "{err}");
    assert!(err.contains("bad.toml:6:30: routes[0].split.ghost: no backend named \"ghost\""), "{err}");
    assert!(err.contains("3 errors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_config_is_a_clear_error() {
    let (code, _, err) = switchyard(&["check", "-c", "/nonexistent/switchyard.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read the file"), "{err}");
}

/// The real binary, as an operator starts it: serves traffic, logs JSON lines to stderr,
/// and exits 0 on SIGTERM.
#[tokio::test]
async fn run_serves_logs_json_and_stops_on_sigterm() {
    use crate::support::*;
    let blue = TestServer::named("blue").await;
    let port = free_addr().await.port();
    let dir = std::env::temp_dir().join(format!("switchyard-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("switchyard.toml");
    std::fs::write(
        &file,
        format!(
            "[listen]\nhttp = \"127.0.0.1:{port}\"\n[admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\n{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 100 }}\n",
            dir.join("admin.sock").display(),
            dir.join("state").display(),
            backend("blue", &[&blue])
        ),
    )
    .expect("write");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c", file.to_str().expect("utf-8")])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let url = format!("http://127.0.0.1:{port}/");
    let client = client();
    let mut answer = None;
    for _ in 0..200 {
        if let Ok(a) = fetch(&client, get(&url)).await {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let (status, _, body) = answer.expect("switchyard answers within 5 s");
    assert_eq!((status.as_u16(), body.as_str()), (200, "blue"));

    // ctl against the running binary: a table for people, JSON and exit 1 for a refusal.
    let socket = dir.join("admin.sock");
    let socket = socket.to_str().expect("utf-8");
    let (code, out, err) = switchyard(&["ctl", "--socket", socket, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("route r  split blue=100.0 (config)"), "{out}");
    let (code, out, _) = switchyard(&["ctl", "--socket", socket, "--json", "set-weights", "r", "blue=50"]);
    assert_eq!(code, 1);
    let answer: serde_json::Value = serde_json::from_str(&out).expect("one JSON line");
    assert_eq!(answer["ok"], false);
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("sum to 50 %")), "{answer}");
    // --json after the verb, as people type it.
    let (code, out, err) = switchyard(&["ctl", "--socket", socket, "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("one JSON line");
    assert_eq!(answer["routes"][0]["name"], "r", "{answer}");
    // A socket that is not there: the cause said once.
    let (code, _, err) = switchyard(&["ctl", "--socket", "/nonexistent/switchyard.sock", "status"]);
    assert_eq!(code, 1);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    let pid = child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let (code, _, _) = switchyard(&["ctl", "--socket", socket, "status"]);
    assert_eq!(code, 0, "still serving after SIGHUP");
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits within 10 s")
        .expect("output");
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    let first = log.lines().next().expect("a log line");
    assert!(first.starts_with('{') && first.contains("\"switchyard is serving\""), "{log}");
    assert!(log.contains("SIGHUP: reloading the config"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The demo is the README's first command: it must run clean on a bare machine and tell
/// the whole story: a faulty canary measured and rolled back with its reason, a drain, a
/// healthy canary promoted step by step to 100 %.
#[test]
fn the_demo_tells_the_rollout_story_shows_a_drain_and_compares_a_shadow() {
    let (code, out, err) = switchyard(&["demo"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("failed: 0 (beyond"), "{out}");
    assert!(out.contains("conversations that changed version other than by the rollout: 0"), "{out}");
    let (act_1, act_2) = out.split_once("act 2").unwrap_or_else(|| panic!("two acts:\n{out}"));
    assert!(act_1.contains("rollout RolledBack") && act_1.contains("why: error rate"), "{out}");
    for step in ["step 1/3, canary 20.0 %", "step 2/3, canary 50.0 %", "rollout Complete: step 3/3, canary 100.0 %"] {
        assert!(act_2.contains(step), "{step} in act 2:\n{out}");
    }
    let drain = out.lines().find(|l| l.contains("drained")).unwrap_or_else(|| panic!("no drain line:\n{out}"));
    assert!(
        drain.contains("→ 0") || drain.contains("in flight 0"),
        "the drained server's in-flight count reaches 0: {drain}"
    );
    assert!(act_1.contains("v1.1.0") && act_2.contains("v1.2.0"), "both canaries served: {out}");
    let (_, act_3) = out.split_once("act 3").unwrap_or_else(|| panic!("three acts:\n{out}"));
    assert!(act_3.contains("conversations answered by the shadow: 0"), "{out}");
    let compared = act_3.lines().find(|l| l.contains("copies compared")).unwrap_or_else(|| panic!("{out}"));
    assert!(compared.contains("match") && compared.contains("body_mismatch"), "{compared}");
    assert!(act_3.contains("token 8) in the primary") && act_3.contains("token 10) in the shadow"), "{out}");
}
