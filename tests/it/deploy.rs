//! `deploy/` checked as far as a machine without a container engine allows: every file
//! parses, every variable it sets is one `.env.example` documents, every port and health
//! probe is the code's own (`ServiceName`), the images and pods run as non-root, and the
//! systemd unit passes `systemd-analyze verify`. Also `orchestrator health <service>`, the
//! compose healthcheck, against a running stack.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use orchestrator_kit::ServiceName;
use orchestrator_kit::config::url_var;
use serde::Deserialize;
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// Where the image keeps its state, and what every shape sets ORCH_DATA_DIR to.
const DATA_DIR: &str = "/var/lib/orchestrator";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `.env.example`: every `NAME=default` (Some) and `#NAME=` (None) line.
fn env_example() -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    for line in read(".env.example").lines() {
        let (commented, line) = match line.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let is_name = name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_name {
            // As dotenv reads it: surrounding double quotes are not part of the value.
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            vars.insert(name.to_owned(), (!commented).then(|| value.to_owned()));
        }
    }
    assert!(
        vars.contains_key("ORCH_DATABASE_URL") && vars.contains_key("ORCH_LAUNCHER_ADDR"),
        ".env.example parsed to {vars:?}"
    );
    vars
}

/// Names that are set but unknown to `.env.example`.
fn undocumented<'a>(
    names: impl IntoIterator<Item = &'a str>,
    known: &BTreeMap<String, Option<String>>,
) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|n| !known.contains_key(*n))
        .collect()
}

/// Every document of a YAML file, with `<<` merge keys applied.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
        value.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

fn port(service: ServiceName) -> u16 {
    service
        .default_addr()
        .parse::<SocketAddr>()
        .expect("a default address is IP:PORT")
        .port()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(s)
        .collect()
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("expected a mapping, got {v:?}"))
        .keys()
        .map(s)
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let rel = path.strip_prefix(root()).expect("under the root");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    assert!(
        files.iter().any(|f| f == "deploy/compose.yaml"),
        "compose.yaml is missing: {files:?}"
    );
    assert!(files.len() >= 10, "too few YAML files: {files:?}");
    for file in &files {
        assert!(!yaml_docs(file).is_empty(), "{file} holds no document");
    }
}

#[test]
fn compose_runs_each_service_in_its_own_container_on_postgres_at_the_code_s_ports() {
    let known = env_example();
    let compose = &yaml_docs("deploy/compose.yaml")[0];
    let services = &compose["services"];
    let postgres = &services["postgres"];
    assert!(
        s(&postgres["image"]).starts_with("postgres:"),
        "{postgres:?}"
    );
    assert!(
        !postgres["healthcheck"].is_null(),
        "postgres needs a healthcheck"
    );

    for service in ServiceName::ALL {
        let name = service.as_str();
        let c = &services[name];
        assert!(c.is_mapping(), "compose has no service {name}");
        assert_eq!(strings(&c["command"]), ["serve", name], "{name}'s command");
        assert_eq!(s(&c["build"]["dockerfile"]), "deploy/Dockerfile");
        assert!(
            !c["depends_on"]["postgres"].is_null(),
            "{name} waits for postgres"
        );
        assert_eq!(
            strings(&c["healthcheck"]["test"]),
            ["CMD", "orchestrator", "health", name],
            "{name}'s healthcheck"
        );

        let env = &c["environment"];
        let set = keys(env);
        assert_eq!(
            undocumented(set.iter().copied(), &known),
            Vec::<&str>::new()
        );
        // It listens on its port on every interface of its container and reaches every other
        // service by its compose name.
        assert_eq!(
            s(&env[service.addr_var()]),
            format!("0.0.0.0:{}", port(service))
        );
        for other in ServiceName::ALL {
            assert_eq!(
                s(&env[url_var(other).as_str()]),
                format!("http://{}:{}", other.as_str(), port(other)),
                "{name}: {}",
                url_var(other)
            );
        }
        assert!(
            s(&env["ORCH_DATABASE_URL"]).starts_with("postgres://")
                && s(&env["ORCH_DATABASE_URL"]).contains("@postgres:5432/"),
            "{name}: ORCH_DATABASE_URL"
        );
        assert_eq!(s(&env["ORCH_DATA_DIR"]), DATA_DIR);

        let published: Vec<&str> = if c["ports"].is_null() {
            Vec::new()
        } else {
            strings(&c["ports"])
        };
        if service == ServiceName::Gateway {
            assert_eq!(published, [format!("{0}:{0}", port(service))]);
        } else {
            assert_eq!(published, Vec::<&str>::new(), "{name} stays internal");
        }
    }
}

/// The Kubernetes objects of `deploy/k8s`, by kind and name.
struct K8s {
    objects: BTreeMap<(String, String), Value>,
}

impl K8s {
    fn load() -> Self {
        let kustomization = &yaml_docs("deploy/k8s/kustomization.yaml")[0];
        let resources = strings(&kustomization["resources"]);
        // Every manifest is applied by `kubectl apply -k`, except the optional Ingress.
        let mut on_disk = Vec::new();
        yaml_files(&root().join("deploy/k8s"), &mut on_disk);
        for file in &on_disk {
            let base = file.trim_start_matches("deploy/k8s/");
            assert!(
                base == "kustomization.yaml" || base == "ingress.yaml" || resources.contains(&base),
                "{file} is not in kustomization.yaml's resources"
            );
        }
        let mut objects = BTreeMap::new();
        for file in resources.iter().copied().chain(["ingress.yaml"]) {
            for doc in yaml_docs(&format!("deploy/k8s/{file}")) {
                let key = (
                    s(&doc["kind"]).to_owned(),
                    s(&doc["metadata"]["name"]).to_owned(),
                );
                assert!(objects.insert(key.clone(), doc).is_none(), "{key:?} twice");
            }
        }
        K8s { objects }
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .get(&(kind.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
    }
}

fn assert_probe(probe: &Value, service: ServiceName, what: &str) {
    let name = service.as_str();
    match service.grpc_name() {
        Some(grpc_name) => {
            assert_eq!(
                probe["grpc"]["port"].as_u64(),
                Some(u64::from(port(service))),
                "{name} {what}"
            );
            assert_eq!(s(&probe["grpc"]["service"]), grpc_name, "{name} {what}");
        }
        None => {
            assert_eq!(s(&probe["httpGet"]["path"]), "/healthz", "{name} {what}");
            assert_eq!(
                probe["httpGet"]["port"].as_u64(),
                Some(u64::from(port(service))),
                "{name} {what}"
            );
        }
    }
}

#[test]
fn k8s_runs_a_deployment_and_a_service_per_service_with_the_code_s_ports_and_probes() {
    let known = env_example();
    let k8s = K8s::load();
    for service in ServiceName::ALL {
        let name = service.as_str();
        let deployment = k8s.get("Deployment", name);
        let replicas = deployment["spec"]["replicas"].as_u64().expect("replicas");
        if service == ServiceName::Launcher {
            assert!(replicas > 1, "the launcher runs more than one replica");
        }
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
        assert!(
            pod["securityContext"]["runAsUser"].as_u64() > Some(0),
            "{name}"
        );
        let containers = pod["containers"].as_sequence().expect("containers");
        assert_eq!(containers.len(), 1, "{name}");
        let c = &containers[0];

        let args = strings(&c["args"]);
        assert_eq!(args.len(), 2, "{name}: {args:?}");
        assert_eq!(args[0], "serve");
        assert_eq!(
            args[1].parse::<ServiceName>().ok(),
            Some(service),
            "{name}: {args:?}"
        );

        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false)
        );
        assert!(
            !c["resources"]["requests"]["cpu"].is_null(),
            "{name}: cpu request"
        );
        assert!(
            !c["resources"]["requests"]["memory"].is_null(),
            "{name}: memory request"
        );
        assert!(
            !c["resources"]["limits"]["memory"].is_null(),
            "{name}: memory limit"
        );

        let ports = c["ports"].as_sequence().expect("ports");
        assert_eq!(ports.len(), 1, "{name}");
        assert_eq!(
            ports[0]["containerPort"].as_u64(),
            Some(u64::from(port(service))),
            "{name}"
        );
        for what in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_probe(&c[what], service, what);
        }

        for from in c["envFrom"].as_sequence().expect("envFrom") {
            if let Some(cm) = from["configMapRef"]["name"].as_str() {
                k8s.get("ConfigMap", cm);
            } else {
                k8s.get("Secret", s(&from["secretRef"]["name"]));
            }
        }
        if let Some(env) = c["env"].as_sequence() {
            let set: Vec<&str> = env.iter().map(|e| s(&e["name"])).collect();
            assert_eq!(undocumented(set, &known), Vec::<&str>::new(), "{name}");
        }

        let svc = k8s.get("Service", name);
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_mapping().expect("selector") {
            assert_eq!(&labels[s(k)], v, "{name}'s Service selects its pods");
        }
        let svc_ports = svc["spec"]["ports"].as_sequence().expect("ports");
        assert_eq!(
            svc_ports[0]["port"].as_u64(),
            Some(u64::from(port(service))),
            "{name}"
        );
        assert_eq!(svc_ports[0]["targetPort"], ports[0]["name"], "{name}");
    }

    let backend = &k8s.get("Ingress", "gateway")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
        ["service"];
    assert_eq!(s(&backend["name"]), "gateway");
    assert_eq!(
        backend["port"]["number"].as_u64(),
        Some(u64::from(port(ServiceName::Gateway)))
    );
}

#[test]
fn k8s_config_map_is_env_example_with_the_cluster_s_addresses_and_secrets_apart() {
    let known = env_example();
    let k8s = K8s::load();
    let data = k8s.get("ConfigMap", "orchestrator-config")["data"]
        .as_mapping()
        .expect("data");
    let data: BTreeMap<&str, &str> = data.iter().map(|(k, v)| (s(k), s(v))).collect();
    assert_eq!(
        undocumented(data.keys().copied(), &known),
        Vec::<&str>::new()
    );

    let mut cluster = BTreeMap::new();
    for service in ServiceName::ALL {
        cluster.insert(
            service.addr_var().to_owned(),
            format!("0.0.0.0:{}", port(service)),
        );
        cluster.insert(
            url_var(service),
            format!("http://{}:{}", service.as_str(), port(service)),
        );
    }
    cluster.insert("ORCH_DATA_DIR".to_owned(), DATA_DIR.to_owned());
    cluster.insert("ORCH_LOG_FORMAT".to_owned(), "json".to_owned());
    for (name, value) in &cluster {
        assert_eq!(data.get(name.as_str()), Some(&value.as_str()), "{name}");
    }
    // Every default of .env.example is there, with its value: a new variable shows up here.
    let missing: Vec<String> = known
        .iter()
        .filter_map(|(name, default)| Some((name, default.as_ref()?)))
        .filter(|(name, default)| {
            !cluster.contains_key(name.as_str())
                && data.get(name.as_str()) != Some(&default.as_str())
        })
        .map(|(name, default)| format!("  {name}: {default:?}"))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/k8s/configmap.yaml differs from .env.example; its data should hold:\n{}",
        missing.join("\n")
    );

    let secret = k8s.get("Secret", "orchestrator-secrets");
    let secrets = keys(&secret["stringData"]);
    assert_eq!(
        undocumented(secrets.iter().copied(), &known),
        Vec::<&str>::new()
    );
    for name in [
        "ORCH_DATABASE_URL",
        "ORCH_INTERNAL_TOKEN",
        "PLANE_API_TOKEN",
        "GITEA_TOKEN",
    ] {
        assert!(secrets.contains(&name), "{name} belongs in the Secret");
    }
    for name in &secrets {
        assert!(
            !data.contains_key(name),
            "{name} is both in the ConfigMap and the Secret"
        );
    }
}

/// The `[Service]` section of the unit: key -> every value given (keys may repeat).
fn unit_service_section(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = String::new();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            out.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    out
}

#[test]
fn systemd_unit_runs_up_as_a_dynamic_user_with_its_state_directory() {
    let known = env_example();
    let text = read("deploy/systemd/orchestrator.service");
    let unit = unit_service_section(&text);
    let one = |k: &str| -> &str {
        match unit.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: expected one value, got {other:?}"),
        }
    };
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert!(
        exec[0].starts_with('/') && exec[0].ends_with("/orchestrator"),
        "{exec:?}"
    );
    assert_eq!(exec[1..], ["up"]);
    assert!(
        one("DynamicUser") == "yes" || unit.get("User").is_some_and(|u| u[0] != "root"),
        "runs as a non-root user"
    );
    assert_eq!(one("StateDirectory"), "orchestrator");
    assert!(
        one("EnvironmentFile")
            .trim_start_matches('-')
            .starts_with("/etc/")
    );
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");

    // The variables it sets: ours are documented, ORCH_DATA_DIR is the StateDirectory.
    let mut set = BTreeMap::new();
    for assignment in unit.get("Environment").into_iter().flatten() {
        let (k, v) = assignment.split_once('=').expect("NAME=value");
        set.insert(k, v);
    }
    let ours = set
        .keys()
        .copied()
        .filter(|k| k.starts_with("ORCH_") || k.starts_with("PLANE_") || k.starts_with("GITEA_"));
    assert_eq!(undocumented(ours, &known), Vec::<&str>::new());
    for name in set.keys() {
        assert!(
            known.contains_key(*name) || *name == "HOME",
            "the unit sets {name}, which .env.example does not document"
        );
    }
    assert_eq!(set.get("ORCH_DATA_DIR"), Some(&DATA_DIR));
    assert_eq!(one("WorkingDirectory"), DATA_DIR);

    // systemd's own check, with ExecStart pointing at this build (it checks the file).
    let Ok(out) = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    else {
        // Not orchestrator_testkit::skip: that one fails under ORCH_REQUIRE_POSTGRES, which is
        // about PostgreSQL, not systemd.
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    assert!(out.success(), "systemd-analyze --version");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orchestrator.service");
    std::fs::write(&path, text.replace(exec[0], BIN)).expect("write the unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    // Only what it says about our unit: a host's own units may draw warnings of their own.
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("orchestrator.service"))
        .collect();
    assert!(
        verify.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, args) = current.split_once(' ').expect("INSTRUCTION args");
                out.push((instruction.to_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

fn json_array(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("exec form expected, got {args}: {e}"))
}

#[test]
fn dockerfile_builds_release_locked_and_runs_orchestrator_as_non_root() {
    let known = env_example();
    let instructions = dockerfile();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    // The builder's Rust is the workspace's rust-version.
    let cargo = read("Cargo.toml");
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    assert!(
        stages[0].starts_with(&format!("rust:{rust_version}-")) && stages[0].ends_with(" AS build"),
        "{}",
        stages[0]
    );

    let runtime_from = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("a runtime stage");
    let (build, runtime) = instructions.split_at(runtime_from);
    assert!(
        build
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")),
        "the build stage builds --release --locked"
    );
    let runs: String = runtime
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    for package in ["git", "ca-certificates"] {
        assert!(
            runs.split_whitespace().any(|w| w == package),
            "the runtime stage installs {package}"
        );
    }
    assert!(
        runtime
            .iter()
            .any(|(i, a)| i == "COPY" && a.starts_with("--from=build ")),
        "the runtime stage copies the binary from the build stage"
    );

    let last = |name: &str| {
        runtime
            .iter()
            .rev()
            .find(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no {name} in the runtime stage"))
    };
    let user = last("USER").split(':').next().expect("a user");
    assert!(user != "root" && user != "0", "USER {user}");
    let entrypoint = json_array(last("ENTRYPOINT"));
    assert_eq!(
        entrypoint.last().map(String::as_str),
        Some("orchestrator"),
        "{entrypoint:?}"
    );
    let cmd = json_array(last("CMD"));
    assert_eq!(cmd.len(), 2, "{cmd:?}");
    assert_eq!(cmd[0], "serve");
    assert!(cmd[1].parse::<ServiceName>().is_ok(), "{cmd:?}");

    let env: Vec<&str> = runtime
        .iter()
        .filter(|(i, _)| i == "ENV")
        .filter_map(|(_, a)| a.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(undocumented(env, &known), Vec::<&str>::new());
    assert!(
        runtime
            .iter()
            .any(|(i, a)| i == "ENV" && *a == format!("ORCH_DATA_DIR={DATA_DIR}"))
    );
    let exposed: BTreeSet<u16> = last("EXPOSE")
        .split_whitespace()
        .map(|p| p.parse().expect("a port"))
        .collect();
    let ours: BTreeSet<u16> = ServiceName::ALL.into_iter().map(port).collect();
    assert_eq!(exposed, ours);

    let ignore = read("deploy/Dockerfile.dockerignore");
    for excluded in ["target", ".env", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == excluded),
            "{excluded} is not in the build context"
        );
    }
}

/// Kills the process when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn health(
    dir: &Path,
    addrs: &BTreeMap<ServiceName, String>,
    service: ServiceName,
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    // The tempdir: no stray ./.env.
    cmd.arg("health").arg(service.as_str()).current_dir(dir);
    for (part, addr) in addrs {
        cmd.env(part.addr_var(), addr);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn health_answers_zero_for_a_serving_part_and_one_for_a_silent_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(BIN);
    cmd.arg("up")
        .current_dir(dir.path())
        .env("ORCH_DATA_DIR", dir.path().join("var"))
        .env(
            "ORCH_AGENTS_DIR",
            orchestrator_testkit::examples_agents_dir(),
        )
        .env_remove("ORCH_DATABASE_URL")
        .env_remove("ORCH_INTERNAL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for part in ServiceName::ALL {
        // 0.0.0.0 as in a container: health must reach it on loopback.
        cmd.env(part.addr_var(), "0.0.0.0:0");
    }
    let mut up = Running(cmd.spawn().expect("spawns"));
    let stdout = up.0.stdout.take().expect("stdout");
    let mut addrs = BTreeMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if line.starts_with("ready") {
            break;
        }
        if let [name, "listening", "on", addr] = line.split_whitespace().collect::<Vec<_>>()[..] {
            addrs.insert(
                name.parse::<ServiceName>().expect("a part"),
                addr.to_owned(),
            );
        }
    }
    assert_eq!(addrs.len(), ServiceName::ALL.len(), "{addrs:?}");

    for service in ServiceName::ALL {
        let (ok, stdout, stderr) = health(dir.path(), &addrs, service);
        assert!(ok, "{service}: {stdout} {stderr}");
        let expected = if service.grpc_name().is_some() {
            "SERVING"
        } else {
            "/healthz"
        };
        assert!(stdout.contains(expected), "{service}: {stdout}");
    }

    // A port nobody listens on: the launcher's address taken from a closed listener.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    addrs.insert(ServiceName::Launcher, closed.to_string());
    let (ok, _, stderr) = health(dir.path(), &addrs, ServiceName::Launcher);
    assert!(!ok, "a silent port is not healthy");
    assert!(stderr.starts_with("error: launcher"), "{stderr}");

    // Port 0 says nothing about where it listens.
    addrs.insert(ServiceName::Launcher, "127.0.0.1:0".to_owned());
    let (ok, _, stderr) = health(dir.path(), &addrs, ServiceName::Launcher);
    assert!(!ok);
    assert!(
        stderr.starts_with("error: ORCH_LAUNCHER_ADDR: port 0"),
        "{stderr}"
    );
}
