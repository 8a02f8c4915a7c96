//! `ktctl console`: the fleet in a browser. ktctl serves the page on loopback and talks to the
//! coordinator with the operator's own certificate from the ktctl context: no new login, no new
//! network surface (the pattern of `kubectl argo rollouts dashboard`). What may reach it is in
//! [`guard`]; the page, its script and its styles are embedded in the binary.

mod api;
pub mod decisions;
pub mod guard;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kt_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

use crate::Session;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the console listens: loopback unless you say otherwise (anything reaching it acts
    /// as you, with your token).
    #[arg(long, default_value = "127.0.0.1:3100")]
    pub listen: SocketAddr,
    /// Open the console in the default browser (`xdg-open`).
    #[arg(long)]
    pub open: bool,
    /// Write the console's URL (with its token) to this file once it listens (for scripts).
    #[arg(long, hide = true)]
    pub url_file: Option<std::path::PathBuf>,
}

/// What every handler shares.
#[derive(Clone)]
pub struct Console {
    pub client: OperatorServiceClient<Channel>,
    pub session: Arc<Session>,
    pub guard: guard::Guard,
    pub decisions: decisions::Series,
    /// Who the coordinator knows us as (shown on the page; changes are recorded under it).
    pub operator: String,
}

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

pub async fn run(session: Session, args: Args) -> anyhow::Result<()> {
    let context = session.context()?;
    let client = crate::client::connect(&context).await?;
    let operator = kt_proto::tls::identity_of_cert_file(&context.cert)
        .map(|identity| identity.uri())
        .unwrap_or_else(|_| context.cert.display().to_string());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = listener.local_addr()?;
    if !listen.ip().is_loopback() {
        eprintln!(
            "warning: the console listens on {listen}, not loopback: anyone who can reach it and has the URL acts as {operator}"
        );
    }
    let guard = guard::Guard::new(guard::new_token(), listen);
    let url = format!("http://{listen}/?token={}", guard.token());
    let console = Console {
        client: client.clone(),
        session: Arc::new(session),
        guard,
        decisions: decisions::Series::default(),
        operator,
    };
    tokio::spawn(decisions::follow(client, console.decisions.clone()));
    println!(
        "kt-fleet console for {} on {}",
        context.coordinator, context.name
    );
    println!("open {url}");
    println!("(the token in the URL is this console's; Ctrl-C stops it)");
    if let Some(path) = &args.url_file {
        kt_daemon::fs::write_private(path, url.as_bytes())?;
    }
    if args.open {
        // The user's own browser, left running: not ours to stop.
        if let Err(error) = std::process::Command::new("xdg-open").arg(&url).spawn() {
            eprintln!("cannot open a browser ({error}); open the URL above yourself");
        }
    }
    let app = router(console);
    // Ctrl-C ends it at once: the pages' event streams never end by themselves, so waiting
    // for connections to close would wait forever.
    tokio::select! {
        served = axum::serve(listener, app) => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

pub fn router(console: Console) -> Router {
    let api = Router::new()
        .route("/api/whoami", get(api::whoami))
        .route("/api/fleet", get(api::fleet))
        .route("/api/fleet/stream", get(api::fleet_stream))
        .route("/api/rollouts", get(api::rollouts))
        .route("/api/rollouts/{id}/{action}", post(api::control))
        .route("/api/groups/{group}/undo", post(api::undo))
        .route("/api/history", get(api::history))
        .route("/api/diff", get(api::diff))
        .route("/api/events/stream", get(api::events_stream))
        .route("/api/decisions", get(api::decisions))
        .route("/api/doctor", get(api::doctor))
        .route_layer(middleware::from_fn_with_state(console.clone(), check_api));
    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css", STYLE) }),
        )
        .merge(api)
        .with_state(console)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The page. Opened with the token, it sets the cookie and sends the browser back to `/`, so
/// the token leaves the address bar and the history.
async fn index(
    State(console): State<Console>,
    Query(query): Query<TokenQuery>,
    request: Request,
) -> Response {
    if let Err(refused) = console.guard.check_host(request.headers()) {
        return (StatusCode::FORBIDDEN, refused.to_string()).into_response();
    }
    if let Some(token) = query.token {
        if !console.guard.is_token(&token) {
            return (StatusCode::FORBIDDEN, guard::Refusal::Token.to_string()).into_response();
        }
        return (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, console.guard.cookie()),
                (header::LOCATION, "/".to_owned()),
            ],
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing from elsewhere: scripts, styles, connections and frames are the console's.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        INDEX,
    )
        .into_response()
}

async fn check_api(State(console): State<Console>, request: Request, next: Next) -> Response {
    match console.guard.check_api(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            let status = match refused {
                guard::Refusal::Token => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            (
                status,
                axum::Json(serde_json::json!({ "error": refused.to_string() })),
            )
                .into_response()
        }
    }
}
