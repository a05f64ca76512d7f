//! Fuzzing with proptest: signature checking and payload parsing never panic, whatever the
//! bytes — random ones, and the contract samples with bytes flipped, cut or spliced.

use proptest::prelude::*;
use serde_json::Value;

use crate::config::Triggers;
use crate::signature::{sign, verify};
use crate::testdata::{webhook_samples, wire_body};
use crate::translate;

fn triggers() -> Triggers {
    Triggers {
        state: Some("Todo".into()),
        label: Some("orchestrator".into()),
        bot_users: vec!["stream-bot".into()],
    }
}

/// Parses like the handler does, then translates for every event name we know and a few
/// we do not.
fn parse_and_translate(body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let t = triggers();
    for event in translate::PLANE_EVENTS
        .iter()
        .chain(&["", "nope", "workitem.created"])
    {
        let _ = translate::plane(event, &value, &t);
    }
    for event in translate::GITEA_EVENTS.iter().chain(&["", "nope"]) {
        let _ = translate::gitea(event, &value);
    }
}

fn samples() -> Vec<Vec<u8>> {
    webhook_samples()
        .into_iter()
        .map(|(n, ..)| wire_body(n))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, .. ProptestConfig::default() })]

    #[test]
    fn signature_checking_never_panics(
        secret in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
        allow in any::<bool>(),
        header in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let r = verify(secret.as_deref(), allow, header.as_deref(), &body);
        // A random header is never accepted as a signature of the body.
        if secret.is_some() && header.as_deref().is_some_and(|h| !h.trim_ascii().is_empty()) {
            let right = sign(secret.as_deref().unwrap_or_default(), &body);
            if header.as_deref() != Some(right.as_bytes()) {
                prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn a_signature_verifies_only_its_own_body(
        secret in proptest::collection::vec(any::<u8>(), 1..64),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        flip in any::<usize>(),
    ) {
        let sig = sign(&secret, &body);
        prop_assert!(verify(Some(&secret), false, Some(sig.as_bytes()), &body).is_ok());
        if !body.is_empty() {
            let mut other = body.clone();
            let i = flip % other.len();
            other[i] ^= 0x01;
            prop_assert!(verify(Some(&secret), false, Some(sig.as_bytes()), &other).is_err());
        }
    }

    #[test]
    fn random_bytes_never_panic_the_parser(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_and_translate(&body);
    }

    #[test]
    fn random_json_never_panics_the_translation(value in arb_json()) {
        let t = triggers();
        for event in ["issue", "issue_comment", "project"] {
            let _ = translate::plane(event, &value, &t);
        }
        let _ = translate::gitea("pull_request", &value);
        let _ = translate::gitea("push", &value);
    }

    #[test]
    fn mutated_samples_never_panic(
        which in 0usize..10,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let all = samples();
        let mut body = all[which % all.len()].clone();
        for (at, byte) in edits {
            let i = at % body.len();
            body[i] = byte;
        }
        if let Some(c) = cut {
            body.truncate(c % (body.len() + 1));
        }
        parse_and_translate(&body);
    }

    #[test]
    fn samples_with_fields_replaced_never_panic(
        which in 0usize..10,
        path_pick in any::<usize>(),
        replacement in arb_json(),
    ) {
        let all = samples();
        let mut value: Value = serde_json::from_slice(&all[which % all.len()]).expect("sample");
        // Replace one field somewhere in the document with arbitrary JSON.
        let mut paths = Vec::new();
        collect_paths(&value, &mut Vec::new(), &mut paths);
        if !paths.is_empty() {
            let path = &paths[path_pick % paths.len()];
            if let Some(slot) = value.pointer_mut(&path_pointer(path)) {
                *slot = replacement;
            }
        }
        let bytes = serde_json::to_vec(&value).expect("json");
        parse_and_translate(&bytes);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("closed"),
            Just("created"),
            Just("updated"),
            Just(":approved:"),
            Just("-rf"),
            Just("a/b"),
            Just("../x"),
            Just("state"),
            Just("labels"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("action".to_owned()),
                    Just("data".to_owned()),
                    Just("id".to_owned()),
                    Just("pull_request".to_owned()),
                    Just("merged".to_owned()),
                    Just("head".to_owned()),
                    Just("ref".to_owned()),
                    Just("repository".to_owned()),
                    Just("full_name".to_owned()),
                    Just("activity".to_owned()),
                    Just("field".to_owned()),
                    Just("labels".to_owned()),
                    Just("state".to_owned()),
                    Just("project".to_owned()),
                    Just("issue".to_owned()),
                    Just("comment_html".to_owned()),
                    Just("actor".to_owned()),
                    Just("number".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn collect_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(k.clone());
                out.push(prefix.clone());
                collect_paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(i.to_string());
                out.push(prefix.clone());
                collect_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn path_pointer(path: &[String]) -> String {
    path.iter()
        .map(|p| format!("/{}", p.replace('~', "~0").replace('/', "~1")))
        .collect()
}
