//! Background tasks, FastAPI style: `POST /signup` answers 202 at once; after the
//! response is on the wire, a job on the executor thread "sends the welcome email" by
//! appending it to an outbox file, then reports back to the user's room: a browser
//! connected to `ws://…/ws/user/{email}` gets "welcome email sent".
//!
//! ```text
//! cargo run --example background -- 127.0.0.1:9001 /tmp/outbox.txt
//! # in another terminal, e.g. with websocat: websocat ws://127.0.0.1:9001/ws/user/alice@example.com
//! curl -i -X POST --data 'alice@example.com' http://127.0.0.1:9001/signup
//! cat /tmp/outbox.txt
//! curl http://127.0.0.1:9001/metrics | grep ringsocket_tasks_
//! ```
//!
//! When the background queue is full the request gets 503 with `Retry-After: 1` (the
//! default [`QueueFullPolicy::Reject503`]), before anything is promised to the client.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use ringsocket::app::App;
use ringsocket::app::rooms::relay;
use ringsocket::config::Config;
use ringsocket::pubsub::Publisher;
use ringsocket::runtime::{Response, Server};
use ringsocket::tasks::QueueFullPolicy;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let mut args = std::env::args().skip(1);
    let mut config = Config::default();
    if let Some(addr) = args.next() {
        config.bind = addr.parse()?;
    }
    let outbox = Arc::new(PathBuf::from(
        args.next().unwrap_or_else(|| "outbox.txt".into()),
    ));
    let app = App::new()
        .queue_full_policy(QueueFullPolicy::Reject503)
        // Each user's room: what the backend publishes to `user/{email}`.
        .websocket("/ws/user/{email}", |ws| async move {
            let room = format!("user/{}", ws.param::<String>("email").unwrap_or_default());
            relay(ws, &room).await;
        });
    let publisher = app.publisher();
    let app = app.post("/signup", move |req| {
        let outbox = outbox.clone();
        let publisher = publisher.clone();
        async move {
            let email = String::from_utf8_lossy(req.body()).trim().to_owned();
            if email.is_empty() || !email.contains('@') {
                return Response::error(400, "the body must be an email address");
            }
            let queued = req.tasks().add("welcome-email", {
                let email = email.clone();
                move || send_welcome_email(&outbox, &publisher, &email)
            });
            match queued {
                Ok(()) => Response::text(202, format!("welcome email to {email} queued\n")),
                // Under Reject503 the runtime answers 503 in place of this response.
                Err(e) => Response::error(503, &e.to_string()),
            }
        }
    });
    let server = Server::start(config, Arc::new(app))?;
    println!("POST http://{}/signup", server.local_addr());
    // Drains the background queue within `shutdown_timeout_secs` before returning.
    server.run_until_signalled()?;
    Ok(())
}

/// The job: runs on the executor thread, never on an I/O core.
fn send_welcome_email(outbox: &PathBuf, publisher: &Publisher, email: &str) {
    let letter = format!("To: {email}\nSubject: Welcome!\n\nThanks for signing up.\n\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(outbox)
        .and_then(|mut file| file.write_all(letter.as_bytes()));
    match written {
        Ok(()) => {
            tracing::info!(%email, outbox = %outbox.display(), "welcome email sent");
            // Report back: every connection in the user's room, on any core (or, with
            // Redis, any process), gets it.
            if let Err(e) = publisher.publish_text(&format!("user/{email}"), "welcome email sent") {
                tracing::warn!(%email, error = %e, "could not notify the user's room");
            }
        }
        Err(e) => tracing::error!(%email, error = %e, "welcome email not written"),
    }
}
