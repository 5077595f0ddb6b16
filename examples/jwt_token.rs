//! Makes a subscriber's JWT for trying `jwt_secret` or `jwt_public_key` by hand and for
//! the handshake benchmark (`benches/jwt_handshake.sh`). The ES256 key pair is made at
//! run time with `rcgen`; only its public half is written (no key is checked in).
//!
//! ```text
//! cargo run --example jwt_token -- hs256 SECRET [SUB] [TTL_SECS] [TOPICS] [PUBLISH]
//! cargo run --example jwt_token -- es256 DIR    [SUB] [TTL_SECS] [TOPICS] [PUBLISH]
//!     (writes DIR/jwt.pub.pem for jwt_public_key, prints the token)
//! ```
//!
//! `TOPICS` and `PUBLISH` are comma-separated (`lobby,chat:*`); left out, the token has
//! no `topics` claim (every topic) and no `publish` claim (no publishing).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Map, Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jwt_token: {e}");
            eprintln!(
                "usage: jwt_token hs256 SECRET | es256 DIR  [SUB] [TTL_SECS] [TOPICS] [PUBLISH]"
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, String> {
    let (kind, key) = match args {
        [kind, key, ..] => (kind.as_str(), key.as_str()),
        _ => return Err("missing arguments".into()),
    };
    let sub = args.get(2).map_or("user-1", String::as_str);
    let ttl: u64 = match args.get(3) {
        Some(t) => t
            .parse()
            .map_err(|_| format!("TTL_SECS: not a number: {t:?}"))?,
        None => 3600,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(sub));
    claims.insert("exp".into(), json!(now + ttl));
    for (name, arg) in [("topics", args.get(4)), ("publish", args.get(5))] {
        if let Some(list) = arg {
            let items: Vec<Value> = list.split(',').map(|t| json!(t.trim())).collect();
            claims.insert(name.into(), Value::Array(items));
        }
    }
    let claims = Value::Object(claims);
    match kind {
        "hs256" => encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .map_err(|e| e.to_string()),
        "es256" => {
            let pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
            let dir = std::path::Path::new(key);
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let public = dir.join("jwt.pub.pem");
            std::fs::write(&public, pair.public_key_pem())
                .map_err(|e| format!("{}: {e}", public.display()))?;
            let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
                .map_err(|e| e.to_string())?;
            encode(&Header::new(Algorithm::ES256), &claims, &signing).map_err(|e| e.to_string())
        }
        other => Err(format!("unknown algorithm {other:?} (hs256 or es256)")),
    }
}
