//! Which node a proxy is: locally, by a per-node bootstrap token; on
//! Kubernetes, by a projected ServiceAccount token the API server reviews
//! ([`crate::kubernetes::TokenReviewer`]).
//!
//! The token file has one `<node> <token>` pair per line (`#` starts a
//! comment). A proxy sends `authorization: Bearer <token>` on every call; the
//! node is taken from the token, never from what the proxy claims. Tokens are
//! kept only as SHA-256 digests, and looked up by digest, so comparing them
//! leaks nothing useful through timing.

use std::collections::HashMap;
use std::path::Path;

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::Error;
use crate::grpc_connections::Caller;
use crate::kubernetes::TokenReviewer;

/// Tokens shorter than this are refused: they could be guessed.
const MIN_TOKEN_LEN: usize = 16;

/// How the control plane learns which node a caller's proxy runs on.
pub enum NodeAuthenticator {
    /// Bootstrap tokens from a file (local manifests).
    Tokens(NodeTokens),
    /// ServiceAccount tokens checked with TokenReview (Kubernetes); boxed,
    /// it holds its caches.
    Kubernetes(Box<TokenReviewer>),
}

impl NodeAuthenticator {
    /// The node whose proxy made this call. The connection it came on
    /// (its [`Caller`], when served by the gRPC port) is marked
    /// authenticated, so it may stay open.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let caller = request.extensions().get::<Caller>();
        let metadata = request.metadata();
        let node = match self {
            NodeAuthenticator::Tokens(tokens) => tokens.authenticate(metadata),
            NodeAuthenticator::Kubernetes(reviewer) => {
                let token = bearer_token(metadata)?;
                let source = caller.map(|caller| caller.peer.ip());
                reviewer.node_of(token, digest(token), source).await
            }
        }?;
        if let Some(caller) = caller {
            caller.authenticated();
        }
        Ok(node)
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let header = metadata
        .get(weft_api::AUTHORIZATION_HEADER)
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <node token>"))?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <node token>\""))
}

/// The node tokens, by digest.
#[derive(Debug, Default)]
pub struct NodeTokens {
    nodes_by_digest: HashMap<[u8; 32], String>,
}

impl NodeTokens {
    /// Loads the token file.
    pub fn load(path: &Path) -> Result<NodeTokens, Error> {
        let err = |reason: String| Error::NodeTokens {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        NodeTokens::parse(&text).map_err(err)
    }

    /// Parses the token file's text.
    pub fn parse(text: &str) -> Result<NodeTokens, String> {
        let mut tokens = NodeTokens::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(node), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("line {}: expected \"<node> <token>\"", index + 1));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: the token of node {node} is shorter than {MIN_TOKEN_LEN} characters",
                    index + 1
                ));
            }
            if tokens
                .nodes_by_digest
                .insert(digest(token), node.to_owned())
                .is_some()
            {
                return Err(format!("line {}: token used for two nodes", index + 1));
            }
        }
        Ok(tokens)
    }

    /// The node whose token authorizes this call.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let token = bearer_token(metadata)?;
        self.nodes_by_digest
            .get(&digest(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown node token"))
    }
}

pub(crate) fn digest(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().unwrap());
        map
    }

    #[test]
    fn a_token_names_its_node() {
        let tokens = NodeTokens::parse(
            "# nodes\nnode-1 aaaaaaaaaaaaaaaaaaaa\nnode-2 bbbbbbbbbbbbbbbbbbbb # two\n",
        )
        .unwrap();
        assert_eq!(
            tokens
                .authenticate(&metadata("Bearer aaaaaaaaaaaaaaaaaaaa"))
                .unwrap(),
            "node-1"
        );
        assert_eq!(
            tokens
                .authenticate(&metadata("Bearer bbbbbbbbbbbbbbbbbbbb"))
                .unwrap(),
            "node-2"
        );
    }

    #[test]
    fn unknown_missing_or_malformed_credentials_are_refused() {
        let tokens = NodeTokens::parse("node-1 aaaaaaaaaaaaaaaaaaaa").unwrap();
        for value in [
            "Bearer cccccccccccccccccccc",
            "aaaaaaaaaaaaaaaaaaaa",
            "Basic aaaaaaaaaaaaaaaaaaaa",
        ] {
            let status = tokens.authenticate(&metadata(value)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{value}");
        }
        let status = tokens.authenticate(&MetadataMap::new()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_token_files_are_refused_with_the_line() {
        assert!(
            NodeTokens::parse("node-1 short")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(NodeTokens::parse("node-1").unwrap_err().contains("line 1"));
        let dup = "node-1 aaaaaaaaaaaaaaaaaaaa\nnode-2 aaaaaaaaaaaaaaaaaaaa";
        assert!(NodeTokens::parse(dup).unwrap_err().contains("line 2"));
    }
}
