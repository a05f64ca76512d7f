//! Plane's `description_html` and `comment_html` as Markdown-ish plain text, for the agent's
//! task and the terminal. A small, forgiving scanner rather than an HTML parser: it never
//! fails, and whatever it does not understand it drops (the worst case is the text with its
//! tags stripped). No raw HTML survives: every `<...>` is consumed, `<script>` and
//! `<style>` with their content.

/// Returns whether `text` looks like HTML (a tag somewhere), as Plane's `*_html` fields are.
pub fn looks_like_html(text: &str) -> bool {
    let b = text.as_bytes();
    b.windows(2)
        .any(|w| w[0] == b'<' && (w[1].is_ascii_alphabetic() || w[1] == b'/' || w[1] == b'!'))
}

/// Converts HTML to text: paragraphs and breaks become lines, headings `#`, list items
/// `- `, `<code>` and `<pre>` backticks, links `text (href)`, entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = Out::default();
    let mut rest = html;
    // Inside <pre>: whitespace is kept as written.
    let mut pre = 0usize;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            out.text(&decode_entities(rest), pre > 0);
            break;
        };
        if lt > 0 {
            out.text(&decode_entities(&rest[..lt]), pre > 0);
        }
        rest = &rest[lt..];
        // `<` not followed by a name, `/` or `!` is not a tag ("a < b").
        if !rest[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/' || c == '!') {
            out.text("<", pre > 0);
            rest = &rest[1..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |i| &after[i + 3..]);
            continue;
        }
        let Some(gt) = rest.find('>') else {
            // An unclosed `<`: the rest is text, its `<` included (not a tag to obey).
            out.text(&decode_entities(rest), pre > 0);
            break;
        };
        let tag = Tag::parse(&rest[1..gt]);
        rest = &rest[gt + 1..];
        match tag.name.as_str() {
            "script" | "style" | "head" | "title" if !tag.closing => {
                let end = format!("</{}", tag.name);
                rest = find_ci(rest, &end).map_or("", |i| {
                    rest[i..].find('>').map_or("", |j| &rest[i + j + 1..])
                });
            }
            "br" => out.newline(),
            "ul" | "ol" => {
                out.items = 0;
                out.block();
            }
            // Inside a list item a paragraph is the item's own line.
            "p" | "div" if out.items > 0 => out.line_start(),
            "p" | "div" | "section" | "article" | "table" | "tr" | "blockquote" | "hr" => {
                out.block()
            }
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                out.block();
                if !tag.closing {
                    let level = usize::from(tag.name.as_bytes()[1] - b'0');
                    out.marker(&format!("{} ", "#".repeat(level)));
                }
            }
            "li" if !tag.closing => {
                out.items += 1;
                out.line_start();
                out.marker("- ");
            }
            "li" => out.items = out.items.saturating_sub(1),
            "td" | "th" if tag.closing => out.raw(" | "),
            "pre" if tag.closing => {
                pre = pre.saturating_sub(1);
                out.line_start();
                out.raw("```");
                out.block();
            }
            "pre" => {
                pre += 1;
                out.block();
                out.raw("```\n");
            }
            "code" if pre == 0 => out.raw("`"),
            "strong" | "b" => out.raw("**"),
            "em" | "i" => out.raw("*"),
            "a" if !tag.closing => out.link = tag.attr("href").map(decode_entities),
            "a" => {
                if let Some(href) = out.link.take().filter(|h| !h.is_empty()) {
                    out.raw(&format!(" ({href})"));
                }
            }
            "img" => {
                if let Some(alt) = tag.attr("alt").filter(|a| !a.is_empty()) {
                    out.text(&format!("[image: {}]", decode_entities(alt)), false);
                }
            }
            _ => {}
        }
    }
    out.finish()
}

/// The text being built: collapses whitespace outside `<pre>`, at most one blank line.
#[derive(Default)]
struct Out {
    s: String,
    link: Option<String>,
    /// Open `<li>`s.
    items: usize,
    /// A list or heading marker was just written (its space must stay).
    marker: bool,
}

impl Out {
    fn text(&mut self, t: &str, pre: bool) {
        if pre {
            self.raw(t);
            return;
        }
        if !t.trim().is_empty() {
            self.marker = false;
        }
        for (i, word) in t.split_whitespace().enumerate() {
            let starts_with_space = i > 0 || t.starts_with(char::is_whitespace);
            if starts_with_space && !self.s.is_empty() && !self.s.ends_with([' ', '\n']) {
                self.s.push(' ');
            }
            self.s.push_str(word);
        }
        if t.ends_with(char::is_whitespace) && !t.trim().is_empty() {
            self.s.push(' ');
        }
    }

    fn raw(&mut self, t: &str) {
        self.s.push_str(t);
        self.marker = false;
    }

    fn trim_trailing_spaces(&mut self) {
        let kept = self.s.trim_end_matches(' ').len();
        self.s.truncate(kept);
    }

    fn newline(&mut self) {
        self.trim_trailing_spaces();
        self.s.push('\n');
    }

    /// The start of a line: a line break unless at one already.
    fn line_start(&mut self) {
        if self.at_marker() {
            return;
        }
        self.trim_trailing_spaces();
        if !self.s.is_empty() && !self.s.ends_with('\n') {
            self.s.push('\n');
        }
    }

    /// Right after a list or heading marker, whose space must stay.
    fn at_marker(&self) -> bool {
        self.marker
    }

    fn marker(&mut self, m: &str) {
        self.s.push_str(m);
        self.marker = true;
    }

    /// A block boundary: a blank line, unless there is one already (or nothing yet).
    fn block(&mut self) {
        if self.at_marker() {
            return;
        }
        self.trim_trailing_spaces();
        if self.s.is_empty() || self.s.ends_with("\n\n") {
            return;
        }
        if self.s.ends_with('\n') {
            self.s.push('\n');
        } else {
            self.s.push_str("\n\n");
        }
    }

    fn finish(self) -> String {
        let mut lines: Vec<&str> = Vec::new();
        for l in self.s.lines().map(str::trim_end) {
            // At most one blank line in a row.
            if l.is_empty() && lines.last().is_none_or(|p| p.is_empty()) {
                continue;
            }
            lines.push(l);
        }
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines.join("\n")
    }
}

/// A tag's name (lower case), whether it closes, and its raw attributes.
struct Tag<'a> {
    name: String,
    closing: bool,
    attrs: &'a str,
}

impl<'a> Tag<'a> {
    fn parse(inner: &'a str) -> Tag<'a> {
        let inner = inner.trim();
        let (closing, inner) = match inner.strip_prefix('/') {
            Some(r) => (true, r.trim_start()),
            None => (false, inner),
        };
        let end = inner
            .find(|c: char| c.is_whitespace() || c == '/')
            .unwrap_or(inner.len());
        Tag {
            name: inner[..end].to_ascii_lowercase(),
            closing,
            attrs: &inner[end..],
        }
    }

    /// The value of attribute `name` (quoted with `"` or `'`, or bare).
    fn attr(&self, name: &str) -> Option<&'a str> {
        let a = self.attrs;
        let mut from = 0;
        while let Some(i) = find_ci(&a[from..], name) {
            let start = from + i;
            from = start + name.len();
            let before_ok = a[..start]
                .chars()
                .next_back()
                .is_none_or(char::is_whitespace);
            let rest = a[from..].trim_start();
            let (true, Some(v)) = (before_ok, rest.strip_prefix('=')) else {
                continue;
            };
            let v = v.trim_start();
            return Some(match v.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let v = &v[1..];
                    &v[..v.find(q).unwrap_or(v.len())]
                }
                _ => &v[..v.find(char::is_whitespace).unwrap_or(v.len())],
            });
        }
        None
    }
}

/// The byte offset of `needle` (ASCII) in `hay`, ignoring ASCII case.
fn find_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

/// Decodes the named entities Plane writes and every numeric one; an unknown or malformed
/// entity stays as written.
pub fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..].find(';').filter(|i| *i <= 10).map(|i| i + 1);
        let decoded = end.and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let n = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(n)
                }
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plane_html_becomes_text() {
        for (html, text) in [
            (
                "<p>Production needs <code>/healthz</code>.</p>",
                "Production needs `/healthz`.",
            ),
            ("<p>one</p><p>two</p>", "one\n\ntwo"),
            ("<p>a<br>b<br/>c</p>", "a\nb\nc"),
            ("<h2>Why</h2><p>Because.</p>", "## Why\n\nBecause."),
            (
                "<ul><li><p>first</p></li><li>second</li></ul>",
                "- first\n- second",
            ),
            (
                "<p><strong>bold</strong> and <em>soft</em></p>",
                "**bold** and *soft*",
            ),
            (
                "<p>see <a href=\"https://x.test/a?b=1&amp;c=2\">the doc</a></p>",
                "see the doc (https://x.test/a?b=1&c=2)",
            ),
            (
                "<pre><code>fn main() {\n    x();\n}</code></pre>",
                "```\nfn main() {\n    x();\n}\n```",
            ),
            (
                "<p>1 &lt; 2 &amp;&amp; 3 &gt; 2 &#8212; &#x41;&nbsp;b</p>",
                "1 < 2 && 3 > 2 — A b",
            ),
            ("<p>  lots   of\n\n  space </p>", "lots of space"),
            ("<img src=\"x.png\" alt=\"a chart\">", "[image: a chart]"),
            (
                "<mention-component id=\"u1\" label=\"ada\"></mention-component> hi",
                "hi",
            ),
            ("", ""),
        ] {
            assert_eq!(html_to_text(html), text, "{html}");
        }
    }

    #[test]
    fn no_raw_html_survives() {
        for html in [
            "<script>alert('x')</script><p>kept</p>",
            "<STYLE>p{}</STYLE><p>kept</p>",
            "<!-- a comment <p>hidden</p> --><p>kept</p>",
            "<p onclick=\"evil()\">kept</p>",
            "<div><span class=\"a\"><p>kept</p></span></div>",
        ] {
            assert_eq!(html_to_text(html), "kept", "{html}");
        }
    }

    #[test]
    fn malformed_html_never_fails_and_keeps_the_text() {
        for (html, text) in [
            ("<p>unclosed", "unclosed"),
            ("a < b", "a < b"),
            ("tail <b", "tail <b"),
            ("<script>never closed", ""),
            ("<!-- never closed", ""),
            (
                "&bogus; &#xZZ; & alone &#99999999999;",
                "&bogus; &#xZZ; & alone &#99999999999;",
            ),
            ("</p></p>text<p", "text<p"),
            ("<a href=>x</a>", "x"),
        ] {
            assert_eq!(html_to_text(html), text, "{html}");
        }
    }

    #[test]
    fn html_is_told_from_plain_text() {
        assert!(looks_like_html("<p>x</p>"));
        assert!(looks_like_html("text <br> more"));
        assert!(!looks_like_html("a < b and b > c"));
        assert!(!looks_like_html("# Markdown\n\n- item"));
    }
}
