//! Who may use the console. It listens on loopback and speaks to the coordinator with the
//! operator's own certificate, so anything that reaches it acts as that operator: a page of
//! another site in the same browser, another local user, a DNS name rebound to 127.0.0.1.
//!
//! - Every API call needs the per-start token, as the cookie the console sets when the URL it
//!   printed (`/?token=...`) is opened: `HttpOnly`, `SameSite=Strict`, so other sites' pages
//!   never send it.
//! - The `Host` header must name the console itself (no DNS rebinding).
//! - A state-changing call must come from the console's own origin (`Origin`, and
//!   `Sec-Fetch-Site` when the browser sends it) with a JSON body, which a cross-site form
//!   cannot send without a CORS preflight the console never answers.

use axum::http::{HeaderMap, Method, header};

pub const COOKIE: &str = "kt_console";

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or the wrong one.
    Token,
    /// `Host` names something else than the console.
    Host(String),
    /// A state-changing call from another origin, or not with a JSON body.
    Origin(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Token => f.write_str(
                "no console token: open the URL `ktctl console` printed (it sets the token)",
            ),
            Refusal::Host(host) => write!(f, "Host {host:?} is not this console"),
            Refusal::Origin(why) => write!(f, "refused: {why}"),
        }
    }
}

/// What a request must match.
#[derive(Clone, Debug)]
pub struct Guard {
    token: String,
    /// `host:port` values the console answers to.
    hosts: Vec<String>,
}

impl Guard {
    pub fn new(token: String, listen: std::net::SocketAddr) -> Self {
        let port = listen.port();
        let mut hosts = vec![listen.to_string(), format!("localhost:{port}")];
        if listen.ip().is_unspecified() {
            // Listening everywhere (asked for): any name the operator reaches it by, but still
            // only with the token.
            hosts.clear();
        }
        Guard { token, hosts }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The `Set-Cookie` value that carries the token.
    pub fn cookie(&self) -> String {
        format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", self.token)
    }

    /// Whether `given` is the token, compared in constant time.
    pub fn is_token(&self, given: &str) -> bool {
        given.len() == self.token.len()
            && given
                .bytes()
                .zip(self.token.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    /// Checks the host of any request.
    pub fn check_host(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.hosts.is_empty() {
            return Ok(());
        }
        let host = header_text(headers, header::HOST.as_str());
        if self.hosts.contains(&host) {
            Ok(())
        } else {
            Err(Refusal::Host(host))
        }
    }

    /// Checks an API request: the host, the token's cookie, and for a state change its origin.
    pub fn check_api(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        self.check_host(headers)?;
        let cookies = header_text(headers, header::COOKIE.as_str());
        if !cookie_value(&cookies, COOKIE).is_some_and(|c| self.is_token(c)) {
            return Err(Refusal::Token);
        }
        if method == Method::GET || method == Method::HEAD {
            return Ok(());
        }
        let host = header_text(headers, header::HOST.as_str());
        let origin = header_text(headers, header::ORIGIN.as_str());
        if origin != format!("http://{host}") {
            return Err(Refusal::Origin(format!(
                "a change must come from this console's page (Origin {origin:?})"
            )));
        }
        let site = header_text(headers, "sec-fetch-site");
        if !site.is_empty() && site != "same-origin" {
            return Err(Refusal::Origin(format!("Sec-Fetch-Site {site:?}")));
        }
        let content_type = header_text(headers, header::CONTENT_TYPE.as_str());
        if !content_type.starts_with("application/json") {
            return Err(Refusal::Origin(
                "a change must send a JSON body (Content-Type: application/json)".into(),
            ));
        }
        Ok(())
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A fresh token: 256 random bits, hex.
pub fn new_token() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn guard() -> Guard {
        Guard::new("a".repeat(64), "127.0.0.1:3100".parse().expect("addr"))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn reads_need_the_cookie_on_the_consoles_own_host() {
        let g = guard();
        let cookie = format!("other=1; {COOKIE}={}", "a".repeat(64));
        let ok = headers(&[("host", "127.0.0.1:3100"), ("cookie", &cookie)]);
        assert_eq!(g.check_api(&Method::GET, &ok), Ok(()));
        let localhost = headers(&[("host", "localhost:3100"), ("cookie", &cookie)]);
        assert_eq!(g.check_api(&Method::GET, &localhost), Ok(()));
        let no_cookie = headers(&[("host", "127.0.0.1:3100")]);
        assert_eq!(g.check_api(&Method::GET, &no_cookie), Err(Refusal::Token));
        let wrong = headers(&[("host", "127.0.0.1:3100"), ("cookie", "kt_console=bbbb")]);
        assert_eq!(g.check_api(&Method::GET, &wrong), Err(Refusal::Token));
        let rebound = headers(&[("host", "evil.example:3100"), ("cookie", &cookie)]);
        assert!(matches!(
            g.check_api(&Method::GET, &rebound),
            Err(Refusal::Host(_))
        ));
    }

    #[test]
    fn changes_need_the_consoles_origin_and_a_json_body() {
        let g = guard();
        let cookie = format!("{COOKIE}={}", "a".repeat(64));
        let base = [
            ("host", "127.0.0.1:3100"),
            ("cookie", cookie.as_str()),
            ("content-type", "application/json"),
        ];
        let with = |extra: &[(&'static str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            headers(&all)
        };
        let same = with(&[
            ("origin", "http://127.0.0.1:3100"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(g.check_api(&Method::POST, &same), Ok(()));
        for refused in [
            with(&[]),
            with(&[("origin", "http://evil.example")]),
            with(&[
                ("origin", "http://127.0.0.1:3100"),
                ("sec-fetch-site", "cross-site"),
            ]),
            headers(&[
                ("host", "127.0.0.1:3100"),
                ("cookie", cookie.as_str()),
                ("origin", "http://127.0.0.1:3100"),
                ("content-type", "application/x-www-form-urlencoded"),
            ]),
        ] {
            assert!(
                matches!(
                    g.check_api(&Method::POST, &refused),
                    Err(Refusal::Origin(_))
                ),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn tokens_are_fresh_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let g = Guard::new(a.clone(), "127.0.0.1:3100".parse().expect("addr"));
        assert!(g.is_token(&a));
        assert!(!g.is_token(&a[..63]));
        assert!(!g.is_token(&b));
        assert!(g.cookie().contains("HttpOnly") && g.cookie().contains("SameSite=Strict"));
    }
}
