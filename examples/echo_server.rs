//! The README's library example: a FastAPI-style app with a typed WebSocket route and
//! an HTTP route, with logs on.
//!
//! ```text
//! cargo run --example echo_server                      # logs "listening" at INFO
//! cargo run --example listen -- ws://127.0.0.1:9001/ws/7   # type a line: it comes back
//! curl -d 'some text' http://127.0.0.1:9001/notes/first  # 201 "9 bytes"
//! RUST_LOG=ringsocket=debug cargo run --example echo_server   # every connection's end
//! ```

use std::sync::Arc;

use ringsocket::app::App;
use ringsocket::config::Config;
use ringsocket::runtime::{Response, Server};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The one line that turns the library's logs on (INFO, or as RUST_LOG says).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let app = App::new()
        .websocket("/ws/{client_id:u64}", |ws| async move {
            // `{client_id:u64}` was checked before the upgrade: "abc" got a 400.
            let id: u64 = ws.param("client_id").unwrap_or_default();
            ws.accept();
            while let Ok(message) = ws.recv().await {
                if ws.send(message).is_err() {
                    break;
                }
            }
            tracing::info!(id, "client left");
        })
        .post("/notes/{name}", |req| async move {
            Response::text(201, format!("{} bytes", req.body().len()))
        });
    let server = Server::start(Config::default(), Arc::new(app))?;
    println!("listening on {}", server.local_addr());
    // Until Ctrl-C or SIGTERM; then Close 1001 to every connection.
    server.run_until_signalled()?;
    Ok(())
}
