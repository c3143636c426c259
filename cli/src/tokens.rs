//! `fleetmesh tokens`: join tokens for zero-touch enrollment.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use fleetmesh_api::trust::{TokenCreated, TokenView};
use fleetmesh_protocol::api::TokenSpec;

use crate::conn::ConnArgs;
use crate::output::{dash, print_json, table, Output};

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    /// Create a join token and print its join string (shown once).
    Create {
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Labels, e.g. rack=a7,tier=spot.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Fix the enrolled agent's name (default: the node's own name).
        #[arg(long)]
        name: Option<String>,
        /// How many enrollments the token allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Token lifetime.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Coordinator address(es) for the join string [default: the coordinator's --advertise].
        #[arg(long = "coordinator")]
        coordinators: Vec<String>,
    },
    /// List join tokens (never their secrets).
    Ls,
    /// Revoke a join token.
    Revoke { id: String },
}

pub async fn run(conn: &ConnArgs, output: Output, cmd: TokensCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        TokensCmd::Create {
            region,
            jurisdiction,
            provider,
            labels,
            name,
            uses,
            ttl,
            coordinators,
        } => {
            let mut map = std::collections::BTreeMap::new();
            for l in labels {
                let (k, v) =
                    l.split_once('=').ok_or_else(|| anyhow!("label {l:?} is not key=value"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let spec = TokenSpec {
                region,
                jurisdiction,
                provider,
                labels: map,
                name,
                uses: Some(uses),
                ttl: Some(ttl),
                coordinators,
            };
            let created: TokenCreated = c.post_json("/api/v1/tokens", &spec).await?;
            if output == Output::Json {
                return print_json(&created);
            }
            outln!("{}", created.join);
            eprintln!(
                "token {} allows {} enrollment(s) until {}; on a node: fleetmesh-agent --join '<the line above>'",
                created.id, created.uses, created.expires
            );
            Ok(())
        }
        TokensCmd::Ls => {
            let list: Vec<TokenView> = c.get_json("/api/v1/tokens").await?;
            if output == Output::Json {
                return print_json(&list);
            }
            let row = |t: &TokenView| {
                vec![
                    t.id.clone(),
                    t.status.clone(),
                    format!("{}/{}", t.uses, t.max_uses),
                    dash(&t.name),
                    dash(&t.region),
                    dash(&t.jurisdiction),
                    dash(&t.provider),
                    t.expires.clone(),
                ]
            };
            table(
                &["ID", "STATUS", "USES", "NAME", "REGION", "JURISDICTION", "PROVIDER", "EXPIRES"],
                list.iter().map(row).collect(),
            );
            Ok(())
        }
        TokensCmd::Revoke { id } => {
            let _: serde::de::IgnoredAny =
                c.post_json(&format!("/api/v1/tokens/{id}/revoke"), &serde_json::json!({})).await?;
            outln!("revoked token {id}");
            Ok(())
        }
    }
}
