use super::*;

/// Parses SSE text into (event, data) pairs, checking the framing.
fn events(sse: &str) -> Vec<(String, Value)> {
    sse.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut lines = e.lines();
            let name = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .expect("event line");
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .expect("data line");
            assert!(lines.next().is_none(), "one data line per event");
            let data: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(data["type"], name, "event name = data.type");
            (name.to_owned(), data)
        })
        .collect()
}

fn request(prompt: &str, results: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": [{"type": "text", "text": prompt}]})];
    for i in 0..results {
        messages.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": format!("t{i}"), "name": "Write", "input": {}}]}));
        messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": format!("t{i}"), "content": "File created successfully"}]}));
    }
    json!({
        "model": "x", "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code.\nPrimary working directory: /srv/co\nIs directory a git repo: Yes"}],
        "tools": [{"name": "Write"}, {"name": "Edit"}],
        "messages": messages
    })
}

#[test]
fn a_write_turn_streams_a_tool_use_whose_input_joins_to_the_file() {
    let turn = decide(
        Scenario::WriteArtifacts,
        &request("work_item: ORCH-65\nstage: review", 0),
    );
    let ev = events(&sse(&turn));
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(ev[0].1["message"]["usage"]["input_tokens"].as_u64() > Some(0));
    let block = &ev[1].1["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "Write");
    assert_eq!(block["input"], json!({}));
    let joined: String = ev[2..4]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().expect("partial_json")
        })
        .collect();
    let input: Value = serde_json::from_str(&joined).expect("joined input is JSON");
    assert_eq!(
        input["file_path"],
        "/srv/co/docs/work-items/ORCH-65/review.md"
    );
    assert!(
        input["content"]
            .as_str()
            .expect("content")
            .starts_with("---\nwork_item: ORCH-65\nreview_verdict: APPROVED\n---\n")
    );
    assert_eq!(ev[5].1["delta"]["stop_reason"], "tool_use");
    assert!(ev[5].1["usage"]["output_tokens"].as_u64() > Some(1));
}

#[test]
fn after_every_file_has_its_tool_result_the_turn_ends_with_text() {
    let prompt = r#"{"work_item": "ORCH-9", "stage": "development"}"#;
    let files = artifacts("ORCH-9", "development");
    assert_eq!(files.len(), 2);
    for (done, (path, _)) in files.iter().enumerate() {
        match decide(Scenario::WriteArtifacts, &request(prompt, done)) {
            Turn::Write { file_path, .. } => assert_eq!(file_path, format!("/srv/co/{path}")),
            t => panic!("turn {done}: {t:?}"),
        }
    }
    let turn = decide(Scenario::WriteArtifacts, &request(prompt, 2));
    assert!(matches!(turn, Turn::Text(_)), "{turn:?}");
    let ev = events(&sse(&turn));
    assert_eq!(ev[1].1["content_block"]["type"], "text");
    assert_eq!(ev[2].1["delta"]["type"], "text_delta");
    assert_eq!(ev[4].1["delta"]["stop_reason"], "end_turn");
}

#[test]
fn the_lazy_scenario_writes_only_after_the_stop_hook_feedback() {
    let first = decide(
        Scenario::LazyUntilStopHook,
        &request("work_item: ORCH-1\nstage: analysis", 0),
    );
    assert!(matches!(first, Turn::Text(_)), "{first:?}");
    let mut r = request("work_item: ORCH-1\nstage: analysis", 0);
    r["messages"].as_array_mut().expect("messages").push(json!({"role": "user", "content": [{"type": "text", "text": "Stop hook feedback:\n[orchestrator qg-hook]: QUALITY GATE ..."}]}));
    assert!(matches!(
        decide(Scenario::LazyUntilStopHook, &r),
        Turn::Write { .. }
    ));
}

#[tokio::test]
async fn reject_first_gives_one_negative_verdict_per_work_item_and_stage() {
    let server = ModelServer::start().await.expect("starts");
    server.control.reject_first("review");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages", server.base_url());
    let verdict = |key: &'static str, stage: &'static str| {
        let req = http
            .post(&url)
            .json(&request(&format!("work_item: {key}\nstage: {stage}"), 0));
        async move {
            let body = req.send().await.expect("post").text().await.expect("body");
            let joined: String = events(&body)
                .iter()
                .filter_map(|(_, d)| d["delta"]["partial_json"].as_str().map(str::to_owned))
                .collect();
            let input: Value = serde_json::from_str(&joined).expect("input");
            input["content"].as_str().expect("content").to_owned()
        }
    };
    assert!(
        verdict("ORCH-1", "review")
            .await
            .contains("review_verdict: CHANGES_REQUESTED")
    );
    assert!(
        verdict("ORCH-1", "review")
            .await
            .contains("review_verdict: APPROVED")
    );
    assert!(
        verdict("ORCH-2", "review")
            .await
            .contains("review_verdict: CHANGES_REQUESTED")
    );
    assert!(
        verdict("ORCH-1", "testing")
            .await
            .contains("test_status: PASSED")
    );
    for (stage, want) in [
        ("testing", "test_status: FAILED"),
        ("deploy-staging", "staging_status: FAILED"),
        ("deploy", "deploy_status: FAILED"),
    ] {
        assert!(
            artifacts_with("ORCH-1", stage, true)[0].1.contains(want),
            "{stage}"
        );
        assert!(
            !artifacts_with("ORCH-1", stage, false)[0]
                .1
                .contains("FAILED"),
            "{stage}"
        );
    }
}

#[test]
fn fields_are_read_in_every_shape_and_as_whole_words() {
    for (text, want) in [
        ("work_item: ORCH-65", Some("ORCH-65")),
        ("\"work_item\": \"ORCH-65\",", Some("ORCH-65")),
        ("work_item=`ORCH-65`", Some("ORCH-65")),
        ("my_work_item: X-1 and work_item: ORCH-2", Some("ORCH-2")),
        ("no key here", None),
    ] {
        assert_eq!(field(text, "work_item").as_deref(), want, "{text}");
    }
    assert_eq!(
        field("sub_stage: x\nstage: deploy-staging", "stage").as_deref(),
        Some("deploy-staging")
    );
}

#[test]
fn without_tools_or_context_it_answers_text_and_writes_nothing() {
    let mut r = request("work_item: ORCH-1\nstage: analysis", 0);
    r["tools"] = json!([]);
    assert!(matches!(
        decide(Scenario::WriteArtifacts, &r),
        Turn::Text(_)
    ));
    let r = request("hello", 0);
    assert!(matches!(
        decide(Scenario::WriteArtifacts, &r),
        Turn::Text(_)
    ));
}

#[test]
fn failures_carry_the_anthropic_error_body() {
    let (s, h, b) = Failure::RateLimit { retry_after_s: 37 }.response();
    assert_eq!(s.as_u16(), 429);
    assert_eq!(h, vec![("retry-after", "37".to_owned())]);
    assert_eq!(b["type"], "error");
    assert_eq!(b["error"]["type"], "rate_limit_error");
    assert_eq!(Failure::Overloaded.response().0.as_u16(), 529);
    assert_eq!(
        Failure::InvalidKey.response().2["error"]["type"],
        "authentication_error"
    );
    let (s, _, b) = Failure::SpendLimit.response();
    assert_eq!(s.as_u16(), 429);
    assert_eq!(b["error_code"], "enforced_spend_limit_reached");
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("message")
            .contains("usage limits")
    );
}

#[tokio::test]
async fn over_http_it_answers_hello_404_streams_turns_and_fails_on_demand() {
    let server = ModelServer::start().await.expect("starts");
    let http = reqwest::Client::new();
    let url = server.base_url();
    let r = http
        .get(format!("{url}/api/hello"))
        .send()
        .await
        .expect("hello");
    assert_eq!(r.status().as_u16(), 404);

    let post = || {
        http.post(format!("{url}/v1/messages?beta=true"))
            .json(&request("work_item: ORCH-3\nstage: analysis", 0))
            .send()
    };
    let r = post().await.expect("turn");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().expect("ascii"),
        "text/event-stream"
    );
    let ev = events(&r.text().await.expect("body"));
    assert_eq!(ev[1].1["content_block"]["name"], "Write");

    server.control.fail_next(2, Failure::Overloaded);
    assert_eq!(post().await.expect("529").status().as_u16(), 529);
    assert_eq!(post().await.expect("529").status().as_u16(), 529);
    assert_eq!(post().await.expect("ok").status().as_u16(), 200);

    server
        .control
        .fail_always(Failure::RateLimit { retry_after_s: 5 });
    let r = post().await.expect("429");
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    server.control.clear_failure();
    assert_eq!(post().await.expect("ok").status().as_u16(), 200);

    assert_eq!(server.control.requests(), 6);
    assert_eq!(server.control.failures_answered(), 3);
    assert_eq!(server.control.turns_answered(), 3);
}

/// The launcher's prompt: the role prompt, then its "Your task" lines.
const LAUNCHER_PROMPT: &str = "You are the deployer.\n## Your stages: deploy-staging, deploy\n\n---\n\n# Your task\n\n- Work item: ORCH-5 — Ship it\n- Stage: deploy\n- Repository: acme/app (branch `orch/ORCH-5`, base `main`); you are in its checkout.\n";

#[test]
fn the_launchers_task_lines_name_the_item_and_the_stage() {
    assert_eq!(
        task_line(LAUNCHER_PROMPT, "Work item").as_deref(),
        Some("ORCH-5")
    );
    assert_eq!(
        task_line(LAUNCHER_PROMPT, "Stage").as_deref(),
        Some("deploy")
    );
    assert_eq!(task_line("stage: review", "Stage"), None);
    // In deploy the first turn asks git for the deployed commit; the file comes next.
    assert!(matches!(
        decide(Scenario::WriteArtifacts, &request(LAUNCHER_PROMPT, 0)),
        Turn::Bash { .. }
    ));
    match decide(Scenario::WriteArtifacts, &request(LAUNCHER_PROMPT, 1)) {
        Turn::Write { file_path, .. } => {
            assert_eq!(file_path, "/srv/co/docs/work-items/ORCH-5/deploy.md");
        }
        t => panic!("{t:?}"),
    }
}

fn with_feedback(mut r: Value) -> Value {
    r["messages"].as_array_mut().expect("messages").push(json!({"role": "user", "content": [{"type": "text", "text": "Stop hook feedback:\n[orchestrator qg-hook]: QUALITY GATE ..."}]}));
    r
}

/// `LazyFirstRun`: every run reads the checkout first; the first run of a stage then ends
/// its turn without writing until the Stop hook's feedback; a later run writes at once.
#[test]
fn the_lazy_first_run_scenario_is_lazy_in_the_first_run_only() {
    let prompt = "work_item: ORCH-1\nstage: analysis";
    let run = |run_index: usize, r: &Value| {
        decide_in_run(Scenario::LazyFirstRun, r, &mut |_, _| false, &mut |k, s| {
            assert_eq!((k, s), ("ORCH-1", "analysis"));
            run_index
        })
    };
    for n in [0, 1] {
        match run(n, &request(prompt, 0)) {
            Turn::Read { file_path, .. } => assert_eq!(file_path, "/srv/co/README.md"),
            t => panic!("run {n}: {t:?}"),
        }
    }
    // First run: lazy after the read, writes once the hook has spoken, then ends.
    assert!(matches!(run(0, &request(prompt, 1)), Turn::Text(_)));
    match run(0, &with_feedback(request(prompt, 1))) {
        Turn::Write { file_path, .. } => {
            assert_eq!(file_path, "/srv/co/docs/work-items/ORCH-1/analysis.md");
        }
        t => panic!("{t:?}"),
    }
    assert!(matches!(
        run(0, &with_feedback(request(prompt, 2))),
        Turn::Text(_)
    ));
    // A later run (the stage retried) writes right after its read.
    assert!(matches!(run(1, &request(prompt, 1)), Turn::Write { .. }));
    assert!(matches!(run(1, &request(prompt, 2)), Turn::Text(_)));
}

#[test]
fn the_never_writes_scenario_ignores_the_stop_hook() {
    let r = request("work_item: ORCH-1\nstage: review", 0);
    assert!(matches!(decide(Scenario::NeverWrites, &r), Turn::Text(_)));
    assert!(matches!(
        decide(Scenario::NeverWrites, &with_feedback(r)),
        Turn::Text(_)
    ));
}

#[test]
fn a_read_turn_streams_a_tool_use_of_read() {
    let turn = Turn::Read {
        id: "toolu_r".into(),
        file_path: "/srv/co/README.md".into(),
    };
    let ev = events(&sse(&turn));
    assert_eq!(ev[1].1["content_block"]["name"], "Read");
    let joined: String = ev[2..4]
        .iter()
        .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&joined).expect("input"),
        json!({"file_path": "/srv/co/README.md"})
    );
    assert_eq!(ev[5].1["delta"]["stop_reason"], "tool_use");
    let m = message_json(&turn);
    assert_eq!(m["content"][0]["input"]["file_path"], "/srv/co/README.md");
}

#[test]
fn the_session_comes_from_the_header_else_the_metadata() {
    let mut r = request("x", 0);
    r["metadata"] =
        json!({"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"s-1\"}"});
    assert_eq!(session_id(&HeaderMap::new(), &r), "s-1");
    let mut h = HeaderMap::new();
    h.insert("x-claude-code-session-id", HeaderValue::from_static("s-2"));
    assert_eq!(session_id(&h, &r), "s-2");
    assert_eq!(session_id(&HeaderMap::new(), &request("x", 0)), "");
}

/// Over HTTP, runs are told apart by their session: the first is lazy, the second writes;
/// the feedback the model got is kept for the test to read.
#[tokio::test]
async fn over_http_lazy_first_run_counts_runs_by_session() {
    let server = ModelServer::start().await.expect("starts");
    server.control.set_scenario(Scenario::LazyFirstRun);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages", server.base_url());
    let turn = |session: &'static str, body: Value| {
        let req = http
            .post(&url)
            .header("x-claude-code-session-id", session)
            .json(&body);
        async move {
            let ev = events(&req.send().await.expect("post").text().await.expect("body"));
            ev[1].1["content_block"]["type"]
                .as_str()
                .expect("type")
                .to_owned()
        }
    };
    let prompt = "work_item: ORCH-4\nstage: analysis";
    assert_eq!(turn("a", request(prompt, 0)).await, "tool_use");
    assert_eq!(turn("a", request(prompt, 1)).await, "text");
    assert_eq!(turn("b", request(prompt, 0)).await, "tool_use");
    assert_eq!(turn("b", request(prompt, 1)).await, "tool_use");
    assert_eq!(server.control.runs("ORCH-4", "analysis"), 2);
    assert_eq!(server.control.runs("ORCH-4", "review"), 0);
    assert!(server.control.stop_hook_feedback().is_empty());
    assert_eq!(
        turn("a", with_feedback(request(prompt, 1))).await,
        "tool_use"
    );
    let fb = server.control.stop_hook_feedback();
    assert_eq!(fb.len(), 1, "{fb:?}");
    assert!(fb[0].contains("QUALITY GATE"), "{fb:?}");
}

#[test]
fn in_deploy_the_model_asks_git_for_the_head_then_writes_it_as_deployed_sha() {
    let prompt = "work_item: ORCH-3\nstage: deploy";
    let first = decide(Scenario::WriteArtifacts, &request(prompt, 0));
    assert_eq!(
        first,
        Turn::Bash {
            id: "toolu_scripted_head".into(),
            command: HEAD_COMMAND.into()
        }
    );
    let ev = events(&sse(&first));
    assert_eq!(ev[1].1["content_block"]["name"], "Bash");
    let joined: String = ev[2..4]
        .iter()
        .map(|(_, d)| d["delta"]["partial_json"].as_str().expect("partial_json"))
        .collect();
    let input: Value = serde_json::from_str(&joined).expect("input");
    assert_eq!(input["command"], HEAD_COMMAND);

    let sha = "0123456789abcdef0123456789abcdef01234567";
    let mut r = request(prompt, 0);
    let msgs = r["messages"].as_array_mut().expect("messages");
    msgs.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_scripted_head", "name": "Bash", "input": {"command": HEAD_COMMAND}}]}));
    msgs.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_scripted_head", "content": format!("{sha}\n")}]}));
    match decide(Scenario::WriteArtifacts, &r) {
        Turn::Write {
            file_path, content, ..
        } => {
            assert_eq!(file_path, "/srv/co/docs/work-items/ORCH-3/deploy.md");
            assert!(
                content.starts_with(&format!(
                    "---\ndeployed_sha: {sha}\nwork_item: ORCH-3\ndeploy_status: SUCCESS\n"
                )),
                "{content}"
            );
        }
        t => panic!("{t:?}"),
    }
    // Both tool results in: the turn ends.
    let mut r2 = r.clone();
    let msgs = r2["messages"].as_array_mut().expect("messages");
    msgs.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t9", "name": "Write", "input": {}}]}));
    msgs.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "File created successfully"}]}));
    assert!(matches!(
        decide(Scenario::WriteArtifacts, &r2),
        Turn::Text(_)
    ));
}

/// The server records what each run was told: the first request of each CLI session, per
/// work item and stage; side requests (no tools) are not agent turns.
#[tokio::test]
async fn it_records_what_each_run_was_told() {
    let server = ModelServer::start().await.expect("starts");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages", server.base_url());
    let post = |session: &'static str, body: Value| {
        let req = http
            .post(&url)
            .header("x-claude-code-session-id", session)
            .json(&body);
        async move { req.send().await.expect("post").text().await.expect("body") }
    };
    let first = "# Your task\n\n- work_item: ORCH-8\n- stage: development\n\nDESCRIPTION-MARKER";
    let second = "# Your task\n\n- work_item: ORCH-8\n- stage: development\n\nVERDICT-MARKER";
    post("a", request(first, 0)).await;
    post("a", request(first, 1)).await;
    post("b", request(second, 0)).await;
    post(
        "c",
        json!({"messages": [{"role": "user", "content": first}]}),
    )
    .await;
    post("d", request("- work_item: ORCH-8\n- stage: review", 0)).await;
    assert_eq!(server.control.received("ORCH-8", "development").len(), 3);
    let told = server.control.first_requests("ORCH-8", "development");
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(told[0].contains("DESCRIPTION-MARKER"));
    assert!(told[1].contains("VERDICT-MARKER"));
    assert_eq!(server.control.first_requests("ORCH-8", "review").len(), 1);
    assert!(
        server
            .control
            .first_requests("ORCH-9", "development")
            .is_empty()
    );
}

/// The task's own `- work_item:` / `- stage:` lines win over a quoted lookalike, wherever
/// it stands; a negative verdict names its finding.
#[test]
fn the_tasks_lines_win_and_a_negative_verdict_names_its_finding() {
    let text = "Role prompt.\n> work_item: EVIL-1\n> stage: deploy\n# Your task\n\n- work_item: ORCH-3\n- stage: review\n";
    assert_eq!(
        run_of(text),
        Some(("ORCH-3".to_owned(), "review".to_owned()))
    );
    let review = &artifacts_with("ORCH-3", "review", true)[0].1;
    assert!(review.contains(&findings("ORCH-3", "review")), "{review}");
    assert!(
        !artifacts_with("ORCH-3", "review", false)[0]
            .1
            .contains("FINDING-")
    );
}
