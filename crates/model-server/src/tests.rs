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

#[test]
fn the_launchers_prompt_names_the_work_item_and_the_stage() {
    // A role prompt (placeholders, another stage named in a heading), then the launcher's
    // task lines, as services/launcher/src/run.rs writes them.
    let prompt = "You are the deployer.\n- `work_item: <KEY>` is REQUIRED.\n## Your stage: deploy-staging\n\n---\n\n# Your task\n\n- Work item: ORCH-12 — Speed up start-up\n- Stage: review\n- Repository: acme/app (branch `orch/ORCH-12`, base `main`); you are in its checkout.\n";
    match decide(Scenario::WriteArtifacts, &request(prompt, 0)) {
        Turn::Write { file_path, .. } => {
            assert_eq!(file_path, "/srv/co/docs/work-items/ORCH-12/review.md")
        }
        t => panic!("{t:?}"),
    }
}
