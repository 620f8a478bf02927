//! API keys: `Authorization: Bearer <key>`. Keys are kept only as SHA-256
//! hashes and compared in constant time against every known key.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Inference, feedback, samples.
    User,
    /// Everything, including RL jobs and model versions.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (user, admin)")),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Auth {
    /// `--no-auth`: every request is admin.
    Disabled,
    Keys(Vec<([u8; 32], Role)>),
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Auth {
    /// Parses `role:key` entries, or `role:sha256:<hex>` to give a key only by
    /// its hash. Separated by commas or newlines; `#` starts a comment line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for entry in text.split([',', '\n']).map(str::trim) {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (role, key) = entry
                .split_once(':')
                .ok_or_else(|| "an API key entry must look like role:key".to_string())?;
            let role: Role = role.trim().parse()?;
            let digest = match key.strip_prefix("sha256:") {
                Some(hex_digest) => {
                    let bytes = hex::decode(hex_digest)
                        .map_err(|_| "invalid sha256 hex in an API key entry".to_string())?;
                    <[u8; 32]>::try_from(bytes.as_slice())
                        .map_err(|_| "a sha256 key hash has 64 hex digits".to_string())?
                }
                None if key.len() < 16 => {
                    return Err("API keys must be at least 16 characters".into())
                }
                None => hash(key),
            };
            keys.push((digest, role));
        }
        if keys.is_empty() {
            return Err("no API keys given".into());
        }
        Ok(Auth::Keys(keys))
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text)
    }

    /// The role of a bearer token, if it is a known key.
    pub fn role_of(&self, token: Option<&str>) -> Option<Role> {
        match self {
            Auth::Disabled => Some(Role::Admin),
            Auth::Keys(keys) => {
                let presented = hash(token?);
                // Look at every key so timing does not reveal which matched.
                let mut found = None;
                for (digest, role) in keys {
                    if bool::from(digest.ct_eq(&presented)) {
                        found = Some(*role);
                    }
                }
                found
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235).
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub async fn require_user(
    State(auth): State<std::sync::Arc<Auth>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    require(&auth, Role::User, request, next).await
}

pub async fn require_admin(
    State(auth): State<std::sync::Arc<Auth>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    require(&auth, Role::Admin, request, next).await
}

async fn require(
    auth: &Auth,
    needed: Role,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match auth.role_of(bearer(&request)) {
        None => Err(ApiError::Unauthorized),
        Some(role) if role < needed => Err(ApiError::Forbidden),
        Some(role) => {
            // Handlers that show more to admins read the caller's role.
            let mut request = request;
            request.extensions_mut().insert(role);
            Ok(next.run(request).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_roles() {
        let auth = Auth::parse("user:aaaaaaaaaaaaaaaa\n# comment\nadmin:bbbbbbbbbbbbbbbb").unwrap();
        assert_eq!(auth.role_of(Some("aaaaaaaaaaaaaaaa")), Some(Role::User));
        assert_eq!(auth.role_of(Some("bbbbbbbbbbbbbbbb")), Some(Role::Admin));
        assert_eq!(auth.role_of(Some("cccccccccccccccc")), None);
        assert_eq!(auth.role_of(None), None);
        let hashed = format!("user:sha256:{}", hex::encode(hash("dddddddddddddddd")));
        assert_eq!(
            Auth::parse(&hashed)
                .unwrap()
                .role_of(Some("dddddddddddddddd")),
            Some(Role::User)
        );
        assert!(Auth::parse("user:short").is_err());
        assert!(Auth::parse("root:aaaaaaaaaaaaaaaa").is_err());
        assert!(Auth::parse("").is_err());
    }
}
