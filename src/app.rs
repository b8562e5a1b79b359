//! Builds the running hub from its configuration: keys, TLS, the issuer's key set, the hub
//! (with its durable history or its cluster), the router, the start-up messages, and the
//! background tasks. [`run`] builds an [`App`] and then serves connections with it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Key;
use crate::config::ServeConfig;
use crate::config::RESERVE_CONNECTIONS as RESERVE;
use crate::http::{router, AppState};
use crate::hub::{Draft, Hub, HubConfig};
use crate::server::budget::{Budget, Timeouts};
use crate::server::listener::Listener;
use crate::server::shutdown::Shutdown;
use crate::server::tls::Tls;

/// Runs the hub on `listener` until `stop` is cancelled, then shuts down gracefully: builds the
/// [`App`] for `config`, serves connections with it, and stops in order.
///
/// Several hubs may run in one process, each on its own listener with its own `stop`. What is
/// shared by the process: SIGHUP is taken over from its default action (ending the process)
/// for as long as the process lives, and each hub reloads its certificate on it.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new(stop);
    let app = App::build(&config, addr, &shutdown).await?;
    let transport = Listener::new(
        app.budget.clone(),
        app.router.clone(),
        app.tls.clone(),
        app.max_body,
        app.hub.metrics().clone(),
    );
    transport.accept(&listener, &shutdown).await;
    shutdown.drain(listener, &app.hub).await;
    Ok(())
}

/// The running hub and everything around it: what the listener serves connections with, and
/// what an application that embeds the hub mounts and publishes through (see the crate's
/// documentation for an example).
pub struct App {
    pub(crate) hub: Hub,
    /// The cluster's stream, in cluster mode: publishes go through it.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
    /// The connection budget (`--max-connections` and the reserve).
    pub(crate) budget: Budget,
    pub(crate) router: axum::Router,
    pub(crate) tls: Option<Arc<Tls>>,
    /// The largest publish body (`--max-body`).
    pub(crate) max_body: usize,
}

impl App {
    /// Builds the hub for `config`, says how to reach it at `addr`, and starts its background
    /// tasks, which end with `shutdown`.
    pub async fn build(
        config: &ServeConfig,
        addr: SocketAddr,
        shutdown: &Shutdown,
    ) -> anyhow::Result<App> {
        let tls = match &config.tls {
            Some((cert, key)) => Some(Arc::new(Tls::load(cert, key).map_err(anyhow::Error::msg)?)),
            None => None,
        };
        let (mut publisher_key, mut subscriber_key, generated_token) = keys(config)?;
        // `--jwks-url`: one set for both roles (a token's grants say what it may do). Fetched
        // now and hourly by a task that ends with the hub; a failing first fetch is logged and
        // does not stop the start (tokens from the issuer are refused until one succeeds).
        let jwks = match &config.jwks_url {
            Some(url) => {
                let jwks = crate::auth::jwks::Jwks::new(url).map_err(anyhow::Error::msg)?;
                publisher_key = Arc::new(Key::clone(&publisher_key).with_jwks(jwks.clone()));
                subscriber_key = Arc::new(Key::clone(&subscriber_key).with_jwks(jwks.clone()));
                let refresh = jwks.spawn_refresh();
                let stopped = shutdown.token().clone();
                tokio::spawn(async move {
                    stopped.cancelled().await;
                    refresh.abort();
                });
                Some(jwks)
            }
            None => None,
        };
        let hub = open_hub(config)?;
        let cluster = match (&config.redis, &config.nats) {
            (Some(url), _) => Some(
                crate::cluster::Cluster::start(
                    url,
                    hub.clone(),
                    config.history_size,
                    shutdown.token().clone(),
                )
                .await?,
            ),
            (None, Some(urls)) => Some(
                crate::cluster::Cluster::start_nats(
                    urls,
                    config.nats_replicas,
                    hub.clone(),
                    config.history_size,
                    shutdown.token().clone(),
                )
                .await?,
            ),
            (None, None) => None,
        };
        let timeouts = Timeouts {
            idle: config.idle_timeout,
            request: config.request_timeout,
        };
        let budget = Budget::new(config.max_connections, timeouts, hub.metrics().clone());
        let state = AppState {
            hub: hub.clone(),
            connections: Arc::new(budget.clone()),
            publisher_key,
            subscriber_key,
            anonymous: config.anonymous,
            max_body: config.max_body,
            body_timeout: config.body_timeout,
            shutdown: shutdown.token().clone(),
            publish_origins: Arc::new(config.publish_origins.clone()),
            subscriptions: config.subscriptions,
            cluster: cluster.clone(),
            protocol: config.protocol,
            tokens: Arc::new(crate::http::discovery::TokenSettings {
                issuer: config.issuer.clone(),
                resource_identifier: config.resource_identifier.clone(),
                cookie_name: config.cookie_name.clone(),
                authorization_server: config.authorization_server.clone(),
                tls: tls.is_some(),
                metadata: config.publisher_jwt_key.is_some()
                    || config.subscriber_jwt_key.is_some()
                    || jwks.is_some(),
                jwks,
            }),
        };
        if config.issuer.is_none() && generated_token.is_none() {
            tracing::info!("self-issued setup: any iss signed by the configured keys is trusted");
        }
        let router = router(state, config.cors_origins.as_ref());

        let hangup = take_hangup();
        announce(config, addr, tls.is_some(), generated_token);

        // Always: SIGHUP's default action would end the process, streams cut, for an operator
        // who meant to reload (or a `kill -HUP $(pidof ssehub)` meant for a TLS hub).
        let stop = shutdown.token();
        shutdown.spawn_task(reload_on_sighup(tls.clone(), hangup, stop.clone()));
        if let (Some(c), false) = (&cluster, config.coalesce.is_zero()) {
            // Tracked, so that a node leaving says so before the process exits.
            shutdown.spawn_task(crate::cluster::share_machine(c.clone(), stop.clone()));
        }
        // The hub owns its timers (trim, the coalescing retune, heartbeats); they end with
        // the stop signal.
        shutdown.spawn_task(hub.run_timers(config.heartbeat, stop.clone()));
        if let Some(every) = config.clock_interval {
            match &cluster {
                Some(c) => {
                    shutdown.spawn_task(crate::cluster::run_clock(c.clone(), every, stop.clone()))
                }
                None => shutdown.spawn_task(crate::clock::run(hub.clone(), every, stop.clone())),
            };
        }
        Ok(App {
            hub,
            cluster,
            budget,
            router,
            tls,
            max_body: config.max_body,
        })
    }
}

impl App {
    /// The hub's routes (`/.well-known/mercure`, the demo page at `/`, `/ui/`, `/healthz`,
    /// `/readyz`, `/metrics`, the subscription API), to serve on their own or merged into an
    /// application's router (which then must not have a fallback of its own: axum merges only
    /// one). Served by another server than [`run`], event
    /// streams are written by hyper (the server's own HTTP/1.1 writer and its connection
    /// limits are not there).
    pub fn router(&self) -> axum::Router {
        self.router.clone()
    }

    /// The fan-out core, for what the routes do not offer (its metrics, its history, its
    /// shutdown). Publish through [`App::publish`], which goes where this node's updates go
    /// (the cluster's stream in cluster mode).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Publishes an update from the application's own code, as an authorized publisher's
    /// `POST` would be: checked the same way, stored (on disk with a durable history, in the
    /// cluster's stream in cluster mode) and delivered. Returns the update's id. No token is
    /// asked and `--max-body` does not apply: the application decides what it publishes.
    pub async fn publish(&self, mut draft: Draft) -> Result<String, crate::cluster::PublishError> {
        // As a POST's form is read: an empty id or type is as if absent (an empty id asks the
        // hub for one; sent as `id:`, it would reset a browser's last event id).
        draft.id = draft.id.filter(|id| !id.is_empty());
        draft.event_type = draft.event_type.filter(|t| !t.is_empty());
        let published = match draft.validate() {
            Ok(()) => crate::cluster::publish_via(&self.hub, self.cluster.as_ref(), draft).await,
            Err(e) => Err(e.into()),
        };
        // Counted as a refused POST is (the hub counts only what it stores).
        if let Err(crate::cluster::PublishError::Invalid(_)) = &published {
            let rejected = &self.hub.metrics().updates_rejected;
            rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        published
    }
}

/// The hub's settings, from the command line's.
fn hub_config(config: &ServeConfig) -> HubConfig {
    HubConfig {
        history_size: config.history_size,
        history_bytes: config.history_bytes,
        subscriber_queue: config.subscriber_queue,
        coalesce: config.coalesce,
        write_budget: config.write_budget,
        max_subscribers: config.max_connections,
        subscription_events: config.subscriptions,
        max_stream_lifetime: config.max_stream_lifetime,
        template_memory: config.template_memory,
        anonymous_templates: config.anonymous_templates,
        resource_identifier: config.resource_identifier.clone(),
    }
}

/// The hub, with its history reloaded from `--data-dir` when there is one (and no cluster,
/// which keeps the history itself).
fn open_hub(config: &ServeConfig) -> anyhow::Result<Hub> {
    let hub_config = hub_config(config);
    let clustered = config.redis.is_some() || config.nats.is_some();
    Ok(match (&config.data_dir, clustered) {
        (Some(dir), false) => {
            let bounds = crate::hub::store::Bounds {
                updates: if hub_config.history_bytes == 0 {
                    0
                } else {
                    hub_config.history_size
                },
                bytes: hub_config.history_bytes,
            };
            let (store, kept) = tokio::task::block_in_place(|| {
                crate::hub::store::open_or_recover(dir, bounds, config.data_dir_recover)
            })?;
            tracing::info!(
                "history kept in {} ({} updates reloaded); a publish is answered once it is on disk",
                dir.join(crate::hub::store::FILE).display(),
                kept.len()
            );
            Hub::durable(hub_config, store, kept)
        }
        (Some(dir), true) => {
            tracing::info!(
                "cluster mode: the history is kept by the cluster; --data-dir {} is not used",
                dir.display()
            );
            Hub::new(hub_config)
        }
        (None, _) => Hub::new(hub_config),
    })
}

/// The start-up messages: where the hub listens, how many connections it takes, and, with a
/// generated key, a command that publishes to it.
fn announce(config: &ServeConfig, addr: SocketAddr, tls: bool, generated_token: Option<String>) {
    let scheme = if tls { "https" } else { "http" };
    tracing::info!("ssehub listening on {scheme}://{addr}");
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    tracing::info!(
        "up to {} connections at once, subscribers included (--max-connections), and {RESERVE} \
         more for publishes and health checks when full (open-file limit {open_files})",
        config.max_connections,
    );
    // The listener, the runtime, logs and cluster connections need a few descriptors too.
    if (config.max_connections as u64).saturating_add(RESERVE as u64 + 16) > open_files {
        tracing::warn!(
            "--max-connections {} and the {RESERVE} reserve connections come within 16 of the \
             open-file limit ({open_files}): the hub will pause accepting when descriptors run \
             out. Lower --max-connections, or raise the limit (ulimit -n, LimitNOFILE=)",
            config.max_connections
        );
    }
    if let Some(token) = generated_token {
        let publish = format!(
            "ssehub publish --hub {scheme}://{addr}/.well-known/mercure --topic time --data hello --token {token}"
        );
        let curl = format!(
            "curl -d topic=time -d data=hello -H 'Authorization: Bearer {token}' {scheme}://{addr}/.well-known/mercure"
        );
        if config.log_json {
            // One JSON line like every other, for log shippers.
            tracing::warn!(
                publish_command = %publish,
                curl_command = %curl,
                "no --publisher-jwt-key given: using a random key for this run"
            );
        } else {
            eprintln!(
                "No --publisher-jwt-key given: using a random key for this run. Publish with:\n  {publish}\n  {curl}"
            );
        }
    }
}

/// Keys for the run. Without a publisher key, a random secret is made and a token for it
/// returned so that the start-up message can show a working publish command.
pub fn keys(config: &ServeConfig) -> anyhow::Result<(Arc<Key>, Arc<Key>, Option<String>)> {
    let alg = config.jwt_algorithm;
    let load = |flag: &str, k: &str| {
        if crate::auth::is_hmac(alg) && k.len() < 32 {
            tracing::warn!(
                "{flag} is {} bytes: an HMAC secret should be at least 32 random bytes (e.g. \
                 `openssl rand -hex 32`), or tokens can be forged by guessing it",
                k.len()
            );
        }
        Key::load(alg, k).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let (publisher, generated) = match &config.publisher_jwt_key {
        Some(k) => (load("--publisher-jwt-key", k)?, None),
        None => {
            let secret: [u8; 32] = rand::random();
            let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let key = Key::secret(jsonwebtoken::Algorithm::HS256, secret.as_bytes());
            let token = key
                .mint(Some(&["*".to_owned()]), Some(&["*".to_owned()]), None)
                .map_err(anyhow::Error::msg)?;
            (key, Some(token))
        }
    };
    let subscriber = match &config.subscriber_jwt_key {
        Some(k) => load("--subscriber-jwt-key", k)?,
        None => publisher.clone(),
    };
    Ok((Arc::new(publisher), Arc::new(subscriber), generated))
}

/// Re-reads the certificate and key on each SIGHUP; without TLS, says there is nothing to
/// reload.
async fn reload_on_sighup(tls: Option<Arc<Tls>>, hup: Option<Hangup>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else {
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match tls.as_deref().map(Tls::reload) {
                    Some(Ok(())) => tracing::info!("SIGHUP: certificate reloaded"),
                    Some(Err(e)) => tracing::error!("SIGHUP: keeping the old certificate: {e}"),
                    None => tracing::info!("SIGHUP: nothing to reload (no --tls-cert); still serving"),
                },
                _ = stop.cancelled() => return,
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (tls, hup, stop);
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

/// Takes SIGHUP over from its default action (ending the process); done before the hub says
/// it is listening, so that a reload sent as soon as it is ready finds the handler.
fn take_hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP: {e}");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}
