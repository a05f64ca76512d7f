//! The one place HTML is escaped, the page frame, and how numbers and times read.

use std::fmt;

use axum::response::Html;
use orchestrator_kit::time::rfc3339;

use super::Access;

/// Text escaped for HTML content and quoted attribute values. Everything that comes from
/// outside (titles, comments, logs, reasons, names) goes through it.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + c.len_utf8();
        }
        f.write_str(&self.0[last..])
    }
}

/// A value for a URL path segment or query value: everything but unreserved characters
/// percent-encoded (so a key or a job id can never leave its segment).
pub(crate) struct Url<'a>(pub(crate) &'a str);

impl fmt::Display for Url<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

const NAV: &[(&str, &str)] = &[
    ("/", "Board"),
    ("/machine", "Machine room"),
    ("/costs", "Costs"),
];

/// A whole page: the header with its navigation, then `body` (already HTML).
pub(crate) fn page(title: &str, active: &str, access: Option<&Access>, body: &str) -> Html<String> {
    let mut out = String::with_capacity(body.len() + 1024);
    out.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    out.push_str(&format!("<title>{} · orchestrator</title>", Esc(title)));
    out.push_str("<link rel=\"stylesheet\" href=\"/assets/style.css\">");
    out.push_str("<script src=\"/assets/app.js\" defer></script></head><body>");
    out.push_str("<header><a class=\"brand\" href=\"/\">orchestrator</a><nav>");
    for (href, label) in NAV {
        let class = if *href == active {
            " class=\"active\""
        } else {
            ""
        };
        out.push_str(&format!("<a href=\"{href}\"{class}>{label}</a>"));
    }
    out.push_str("</nav>");
    if let Some(a) = access.filter(|a| a.signed_in) {
        out.push_str(&format!(
            "<form method=\"post\" action=\"/signout\" class=\"signout\">{}<button type=\"submit\">Sign out</button></form>",
            csrf_field(a)
        ));
    }
    out.push_str("</header><main>");
    out.push_str(body);
    out.push_str("</main></body></html>");
    Html(out)
}

/// The hidden CSRF field every action form carries.
pub(crate) fn csrf_field(a: &Access) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        Esc(&a.csrf)
    )
}

/// A one-button action form (POST to `action`).
pub(crate) fn action_button(a: &Access, action: &str, label: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"action\">{}<button type=\"submit\" class=\"{class}\">{}</button></form>",
        Esc(action),
        csrf_field(a),
        Esc(label)
    )
}

/// A link to the forge's page `url`, reading `label`: only an `http(s)://` address becomes a
/// link (the local forge's `file://` URLs cannot be opened from a web page, and nothing from
/// outside gets to be a `javascript:` one); any other reads as the label alone.
pub(crate) fn forge_link(url: &str, label: &str) -> String {
    if url.starts_with("https://") || url.starts_with("http://") {
        format!(
            "<a class=\"forge\" href=\"{}\">{}</a>",
            Esc(url),
            Esc(label)
        )
    } else {
        format!("<span class=\"forge\">{}</span>", Esc(label))
    }
}

/// How long ago, as people say it: `just now`, `3 min ago`, `2 h ago`, `5 days ago`.
pub(crate) fn ago(now_ms: i64, at_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..10 => "just now".to_owned(),
        10..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => match s / 86_400 {
            1 => "1 day ago".to_owned(),
            d => format!("{d} days ago"),
        },
    }
}

/// A time as "3 min ago", the exact UTC time on hover; `—` when unset (0).
pub(crate) fn time(now_ms: i64, at_ms: i64) -> String {
    if at_ms <= 0 {
        return "<span class=\"muted\">—</span>".to_owned();
    }
    let exact = rfc3339(at_ms);
    format!(
        "<time datetime=\"{exact}\" title=\"{exact}\">{}</time>",
        ago(now_ms, at_ms)
    )
}

/// A time to come as "in 3 h", the exact UTC time on hover.
pub(crate) fn time_until(now_ms: i64, at_ms: i64) -> String {
    let exact = rfc3339(at_ms);
    format!(
        "<time datetime=\"{exact}\" title=\"{exact}\">in {}</time>",
        duration(at_ms - now_ms)
    )
}

/// A duration: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub(crate) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, ms / 60_000 % 60)
    }
}

/// A status as a badge, its class the status itself (from a fixed set).
pub(crate) fn status_badge(status: &str) -> String {
    let class = match status {
        "active" | "awaiting_approval" | "blocked" | "done" | "cancelled" => status,
        _ => "other",
    };
    format!(
        "<span class=\"badge {class}\">{}</span>",
        Esc(&status.replace('_', " "))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            Esc("<script>alert('x')</script> & \"y\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(Esc("plain · ünïcode").to_string(), "plain · ünïcode");
        assert_eq!(Esc("").to_string(), "");
    }

    #[test]
    fn url_segments_cannot_escape() {
        assert_eq!(Url("ORCH-7").to_string(), "ORCH-7");
        assert_eq!(
            Url("../a b?c#d/é").to_string(),
            "..%2Fa%20b%3Fc%23d%2F%C3%A9"
        );
    }

    #[test]
    fn only_web_addresses_become_forge_links() {
        assert_eq!(
            forge_link("https://git.example/acme/app/pulls/7", "PR #7"),
            "<a class=\"forge\" href=\"https://git.example/acme/app/pulls/7\">PR #7</a>"
        );
        for url in [
            "file:///srv/forge/acme/app.git#pull/7",
            "javascript:alert(1)",
            "",
        ] {
            assert_eq!(
                forge_link(url, "PR #7"),
                "<span class=\"forge\">PR #7</span>",
                "{url}"
            );
        }
        assert!(forge_link("https://x/\"><script>", "<b>").contains("&quot;&gt;&lt;script&gt;"));
    }

    #[test]
    fn ages_read_as_people_say_them() {
        for (secs, want) in [
            (0, "just now"),
            (9, "just now"),
            (42, "42 s ago"),
            (180, "3 min ago"),
            (7_300, "2 h ago"),
            (86_400, "1 day ago"),
            (5 * 86_400 + 7, "5 days ago"),
            (-5, "just now"),
        ] {
            assert_eq!(
                ago(1_000_000_000, 1_000_000_000 - secs * 1000),
                want,
                "{secs}"
            );
        }
    }

    #[test]
    fn times_carry_the_exact_time_on_hover() {
        let t = time(180_001, 1);
        assert!(t.contains("title=\"1970-01-01T00:00:00.001Z\""), "{t}");
        assert!(t.contains(">3 min ago<"), "{t}");
        assert!(time(1, 0).contains('—'));
    }

    #[test]
    fn durations_read_in_the_largest_unit() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(7_380_000), "2 h 03 min");
    }
}
