//! Who may see the dashboard and act on it.
//!
//! - `ORCH_DASHBOARD_TOKEN` set: a sign-in page takes the token and answers with a session
//!   cookie (HttpOnly, SameSite=Strict), signed with a key derived from the token, so no
//!   session table is kept and a restart signs nobody out.
//! - unset: the dashboard answers only when the gateway listens on a loopback address;
//!   on any other address every page is a 403 that says why.
//!
//! Either way every action is a POST carrying a CSRF token: the HMAC of the session, which
//! a page of another origin cannot read.

use std::sync::Arc;

use axum::Form;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use orchestrator_kit::grpc::constant_time_eq;
use orchestrator_kit::time::now_ms;
use serde::Deserialize;

use super::html::{self, Esc};
use crate::Shared;
use crate::signature::sign;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "orch_dashboard";
/// How long a session lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;

/// A request allowed to see the dashboard, with the CSRF token its forms carry.
pub(crate) struct Access {
    pub(crate) csrf: String,
    /// Whether a sign-in stands behind it (and a sign-out button makes sense).
    pub(crate) signed_in: bool,
}

/// Why a request may not see the dashboard.
pub(crate) enum Refusal {
    /// No token and not on loopback: the dashboard is off here.
    NotLoopback(String),
    /// A token is required and the request has no valid session.
    SignIn,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::SignIn => Redirect::to("/signin").into_response(),
            Refusal::NotLoopback(addr) => {
                let body = format!(
                    "<h1>Dashboard off</h1><p class=\"notice\">The gateway listens on <code>{}</code>, \
                     which is not a loopback address, and <code>ORCH_DASHBOARD_TOKEN</code> is not set. \
                     Without a token the dashboard answers only on 127.0.0.1 or ::1, so that nobody \
                     on the network can act on the work items. Set <code>ORCH_DASHBOARD_TOKEN</code> \
                     to sign in from here.</p>",
                    Esc(&addr)
                );
                (
                    StatusCode::FORBIDDEN,
                    html::page("Dashboard off", "", None, &body),
                )
                    .into_response()
            }
        }
    }
}

/// Decides whether the request may see the dashboard.
pub(crate) fn check(shared: &Shared, headers: &HeaderMap) -> Result<Access, Refusal> {
    let d = &shared.dashboard;
    match &d.token {
        None => match d.listen.get() {
            Some(addr) if addr.ip().is_loopback() => Ok(Access {
                csrf: csrf_for(&d.key, ""),
                signed_in: false,
            }),
            Some(addr) => Err(Refusal::NotLoopback(addr.to_string())),
            None => Err(Refusal::NotLoopback("an unknown address".to_owned())),
        },
        Some(_) => {
            let session = cookie(headers, COOKIE).ok_or(Refusal::SignIn)?;
            if !session_valid(&d.key, session, now_ms()) {
                return Err(Refusal::SignIn);
            }
            Ok(Access {
                csrf: csrf_for(&d.key, session),
                signed_in: true,
            })
        }
    }
}

impl FromRequestParts<Arc<Shared>> for Access {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        check(shared, &parts.headers)
    }
}

impl Access {
    /// Whether `given` is this session's CSRF token (compared in constant time).
    pub(crate) fn csrf_ok(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.csrf.as_bytes())
    }
}

/// A new session value: `<issued ms>.<hmac>`.
pub(crate) fn new_session(key: &[u8], now_ms: i64) -> String {
    format!(
        "{now_ms}.{}",
        sign(key, format!("session:{now_ms}").as_bytes())
    )
}

/// Whether `value` is a session this key issued, less than [`SESSION_MS`] ago.
pub(crate) fn session_valid(key: &[u8], value: &str, now_ms: i64) -> bool {
    let Some((issued, mac)) = value.split_once('.') else {
        return false;
    };
    let Ok(issued_ms) = issued.parse::<i64>() else {
        return false;
    };
    let expected = sign(key, format!("session:{issued_ms}").as_bytes());
    constant_time_eq(mac.as_bytes(), expected.as_bytes())
        && issued_ms <= now_ms
        && now_ms - issued_ms < SESSION_MS
}

/// The CSRF token of a session (empty session: the loopback mode's one token).
pub(crate) fn csrf_for(key: &[u8], session: &str) -> String {
    sign(key, format!("csrf:{session}").as_bytes())
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// 32 random bytes from the kernel, hex: the signing key when no token is set. Read once
/// at start-up, so the blocking read is harmless.
pub(crate) fn random_key() -> Vec<u8> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("the kernel's random source (/dev/urandom) is readable");
    bytes.to_vec()
}

pub(crate) async fn signin_page(State(shared): State<Arc<Shared>>) -> Response {
    if shared.dashboard.token.is_none() {
        return Redirect::to("/").into_response();
    }
    html::page("Sign in", "", None, &signin_form(None)).into_response()
}

fn signin_form(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", Esc(e)))
        .unwrap_or_default();
    format!(
        "<h1>Sign in</h1>{error}<form method=\"post\" action=\"/signin\" class=\"signin\">\
         <label>Dashboard token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus></label>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"muted\">The token is <code>ORCH_DASHBOARD_TOKEN</code> on the gateway.</p>"
    )
}

#[derive(Deserialize)]
pub(crate) struct SignIn {
    #[serde(default)]
    token: String,
}

pub(crate) async fn signin(State(shared): State<Arc<Shared>>, Form(f): Form<SignIn>) -> Response {
    let d = &shared.dashboard;
    let Some(token) = &d.token else {
        return Redirect::to("/").into_response();
    };
    if !constant_time_eq(f.token.as_bytes(), token.expose().as_bytes()) {
        tracing::info!("dashboard sign-in refused: wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            html::page(
                "Sign in",
                "",
                None,
                &signin_form(Some("That is not the token.")),
            ),
        )
            .into_response();
    }
    let session = new_session(&d.key, now_ms());
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!(
                    "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                    SESSION_MS / 1000
                ),
            ),
            (header::LOCATION, "/".to_owned()),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
pub(crate) struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn signout(access: Access, Form(f): Form<CsrfOnly>) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return super::actions::csrf_refused();
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::LOCATION, "/signin".to_owned()),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_only_with_its_key_and_in_time() {
        let key = b"k1";
        let s = new_session(key, 1_000);
        assert!(session_valid(key, &s, 1_000));
        assert!(session_valid(key, &s, 1_000 + SESSION_MS - 1));
        assert!(!session_valid(key, &s, 1_000 + SESSION_MS), "expired");
        assert!(!session_valid(key, &s, 999), "from the future");
        assert!(!session_valid(b"k2", &s, 1_000), "another key");
        let forged = s.replacen("1000", "2000", 1);
        assert!(!session_valid(key, &forged, 2_000), "issued time changed");
        for junk in ["", ".", "x.y", "1000", "1000."] {
            assert!(!session_valid(key, junk, 1_000), "{junk:?}");
        }
    }

    #[test]
    fn the_csrf_token_is_bound_to_the_session() {
        assert_eq!(csrf_for(b"k", "s1"), csrf_for(b"k", "s1"));
        assert_ne!(csrf_for(b"k", "s1"), csrf_for(b"k", "s2"));
        assert_ne!(csrf_for(b"k", "s1"), csrf_for(b"j", "s1"));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; orch_dashboard=abc.def".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc.def"));
        assert_eq!(cookie(&h, "a"), Some("1"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
