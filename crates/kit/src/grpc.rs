//! The gRPC server bootstrap every service uses: health (SERVING once ready), reflection
//! (so `grpcurl list` and `describe` work with no .proto at hand), the internal bearer
//! token, and graceful shutdown.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::{Interceptor, Routes};
use tonic::transport::Server;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::config::Secret;
use crate::service::ServiceName;

/// Requires `authorization: Bearer <ORCH_INTERNAL_TOKEN>` on every call when a token is
/// configured. It wraps only the service's own RPCs, so health and reflection stay open.
#[derive(Clone, Default)]
pub struct RequireToken {
    expected: Option<Arc<str>>,
}

impl RequireToken {
    pub fn new(token: Option<&Secret>) -> Self {
        RequireToken {
            expected: token.map(|t| Arc::from(format!("Bearer {}", t.expose()))),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (ORCH_INTERNAL_TOKEN)",
            ))
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `routes` (one service, already wrapped in [`RequireToken`]) on `listener`, with
/// health and reflection beside it, until `shutdown` is cancelled; in-flight calls finish.
pub async fn serve(
    service: ServiceName,
    routes: Routes,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let grpc_name = service.grpc_name().unwrap_or(service.as_str());
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(orchestrator_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .with_service_name(grpc_name)
            .with_service_name("grpc.health.v1.Health")
    };
    // Both reflection versions: grpcurl up to 1.8 speaks only v1alpha, newer clients v1.
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    // Storage is migrated and the listener bound before we get here: the service is ready.
    reporter
        .set_service_status(grpc_name, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;

    // Accepted sockets do not inherit Server::tcp_nodelay (that applies only when tonic binds
    // the listener itself). Without it, Nagle holds the frames of a response that follow
    // the first until the client's delayed ACK: about 40 ms added to an RPC.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let stop = shutdown.clone();
    let result = Server::builder()
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            stop.cancelled().await;
            reporter
                .set_service_status(grpc_name, ServingStatus::NotServing)
                .await;
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
        })
        .await;
    tracing::info!(service = service.as_str(), "stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(interceptor: &mut RequireToken, header: Option<&str>) -> Result<(), Status> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ascii"));
        }
        interceptor.call(req).map(|_| ())
    }

    #[test]
    fn without_a_token_everything_passes() {
        let mut i = RequireToken::new(None);
        assert!(call(&mut i, None).is_ok());
        assert!(call(&mut i, Some("Bearer anything")).is_ok());
    }

    #[test]
    fn with_a_token_only_the_right_bearer_passes() {
        let mut i = RequireToken::new(Some(&Secret::new("t0k")));
        assert_eq!(
            call(&mut i, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut i, Some("Bearer t0x")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut i, Some("t0k")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(call(&mut i, Some("Bearer t0k")).is_ok());
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
