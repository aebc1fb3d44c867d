//! Registry authentication: `WWW-Authenticate` challenges, the Bearer token flow and Basic auth.
//!
//! Tokens are cached per scope and re-fetched when a request comes back 401. Secrets never reach a
//! log line: [`Credentials`] and [`Token`] print as `<redacted>`.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// A username and password (or identity token). Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic ...` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// One parsed challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: "bearer" or "basic".
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parse every challenge in a `WWW-Authenticate` value. Handles quoted values with commas and
/// spaces (`scope="repository:a:pull,push"`), unquoted values and several challenges in one header.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        // A token: either a scheme (followed by space/end) or a param name (followed by '=').
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let word = header[start..i].to_string();
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            // Parameter.
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i] as char);
                    i += 1;
                }
                i += 1; // closing quote
                v
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                header[vs..i].trim().to_string()
            };
            if let Some(last) = out.last_mut() {
                last.params.insert(word.to_ascii_lowercase(), value);
            }
        } else if !word.is_empty() {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

/// A bearer token. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted>, expires {:?})", self.expires)
    }
}

/// The longest a token is kept. A day: long enough that no sane token is refetched early, short
/// enough that `expires_in: 2^63` cannot overflow a clock.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);

/// The JSON a token endpoint answers with.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The spec's default and minimum lifetime is 60 s; renew 10 s early. An absurd lifetime
        // is cut to a day ([`MAX_TOKEN_LIFETIME`]) and never overflows.
        let secs = self
            .expires_in
            .unwrap_or(60)
            .clamp(60, MAX_TOKEN_LIFETIME.as_secs());
        Some(Token {
            value,
            expires: now
                .checked_add(Duration::from_secs(secs - 10))
                .unwrap_or(now),
        })
    }
}

/// How the registry wants to be authenticated, learnt from its first 401.
#[derive(Debug, Clone, Default)]
pub enum Scheme {
    /// No challenge seen yet (or none needed).
    #[default]
    None,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Tokens by scope.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: HashMap<String, Token>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<&Token> {
        self.tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
    }
    pub fn put(&mut self, scope: &str, token: Token) {
        self.tokens.insert(scope.to_string(), token);
    }
    pub fn remove(&mut self, scope: &str) {
        self.tokens.remove(scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_quoted_commas() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(
            c[0].param("scope"),
            Some("repository:samalba/my-app:pull,push")
        );
    }

    #[test]
    fn parses_multiple_and_unquoted() {
        let c = parse_challenges(r#"Basic realm="x y", BEARER Realm=http://h/t, service=svc"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("x y"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("http://h/t"));
        assert_eq!(c[1].param("service"), Some("svc"));
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = TokenResponse {
            token: None,
            access_token: Some("sekrit".into()),
            expires_in: Some(5),
        }
        .into_token(Instant::now())
        .unwrap();
        assert_eq!(t.value, "sekrit");
        assert!(!format!("{t:?}").contains("sekrit"));
        let now = Instant::now();
        let t = TokenResponse {
            token: Some("x".into()),
            access_token: None,
            expires_in: Some(u64::MAX),
        }
        .into_token(now)
        .unwrap();
        assert!(
            t.expires <= now + MAX_TOKEN_LIFETIME,
            "absurd lifetimes saturate"
        );
        assert_eq!(
            c.basic_header(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:hunter2")
            )
        );
    }
}
