//! The internal bearer token: required on every RPC when set; health and reflection stay open.

use orchestrator_kit::clients::{ClientSettings, UsageLedgerClient, channel};
use orchestrator_kit::{Secret, ServiceName};
use orchestrator_proto::usage_ledger::v1::WorkItemSummaryRequest;
use orchestrator_testkit::TestStorage;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::common::start;

fn ledger(url: &str, token: Option<&str>) -> UsageLedgerClient {
    let settings = ClientSettings {
        token: token.map(Secret::new),
        connect_timeout: std::time::Duration::from_secs(2),
        request_timeout: std::time::Duration::from_secs(5),
    };
    UsageLedgerClient::new(channel(ServiceName::UsageLedger, url, &settings).expect("channel"))
}

/// Lists the services a port advertises through reflection, with no token.
pub async fn reflected_services(url: &str) -> Vec<String> {
    let mut client = ServerReflectionClient::new(crate::common::plain_channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream
        .message()
        .await
        .expect("reflection answer")
        .expect("one message");
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_rpcs_need_it_and_health_and_reflection_do_not() {
    let stack = start(
        TestStorage::sqlite(),
        &[("ORCH_INTERNAL_TOKEN", "let-me-in")],
    )
    .await;
    let url = stack.config.url(ServiceName::UsageLedger).to_owned();
    let req = || WorkItemSummaryRequest {
        work_item: "ORCH-1".into(),
    };

    let err = ledger(&url, None)
        .work_item_summary(req())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = ledger(&url, Some("wrong"))
        .work_item_summary(req())
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
    ledger(&url, Some("let-me-in"))
        .work_item_summary(req())
        .await
        .expect("right token");
    // The stack's own clients carry the configured token.
    stack
        .clients
        .usage_ledger
        .clone()
        .work_item_summary(req())
        .await
        .expect("stack client");

    for part in ServiceName::ALL
        .into_iter()
        .filter(|p| *p != ServiceName::Gateway)
    {
        let url = stack.config.url(part).to_owned();
        let mut health = HealthClient::new(crate::common::plain_channel(&url).await);
        let status = health
            .check(HealthCheckRequest {
                service: part.grpc_name().expect("grpc").to_owned(),
            })
            .await
            .expect("health answers without a token")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{part}");
        let services = reflected_services(&url).await;
        assert_eq!(
            services,
            vec![
                "grpc.health.v1.Health".to_owned(),
                part.grpc_name().expect("grpc").to_owned()
            ],
            "{part}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_rpcs_are_open() {
    let stack = start(TestStorage::sqlite(), &[]).await;
    let url = stack.config.url(ServiceName::UsageLedger).to_owned();
    ledger(&url, None)
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-1".into(),
        })
        .await
        .expect("open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_later_issues_answer_unimplemented() {
    use orchestrator_proto::launcher::v1::GetJobRequest;
    use orchestrator_proto::stage_engine::v1::GetWorkItemRequest;
    let stack = start(TestStorage::sqlite(), &[]).await;
    let err = stack
        .clients
        .stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest {
            key: "ORCH-1".into(),
        })
        .await
        .expect_err("unknown work item");
    // Built by #3: an unknown work item is NOT_FOUND, no longer UNIMPLEMENTED.
    assert_eq!(err.code(), Code::NotFound);
    let err = stack
        .clients
        .launcher
        .clone()
        .get_job(GetJobRequest { job_id: "j".into() })
        .await
        .expect_err("unknown job");
    // Built by #4: an unknown job is NOT_FOUND, no longer UNIMPLEMENTED.
    assert_eq!(err.code(), Code::NotFound);
}
