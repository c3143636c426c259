//! `fleetmesh certs`: a mesh CA and the certificates it issues (offline; no API).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use fleetmesh_protocol::pki::{Ca, IssueRequest};
use fleetmesh_protocol::{Attributes, PeerKind};

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a CA: writes DIR/ca.pem and DIR/ca.key (0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
    },
    /// Issue a certificate: writes DIR/<kind>-<name>.pem and .key (0600).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        kind: PeerKind,
        #[arg(long)]
        name: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Lifetime, e.g. 24h, 30d [default: 30d].
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// DNS SAN (servers); repeatable. Coordinators default to localhost.
        #[arg(long)]
        dns: Vec<String>,
        /// IP SAN (servers); repeatable. Coordinators default to 127.0.0.1 and ::1.
        #[arg(long)]
        ip: Vec<IpAddr>,
    },
}

pub fn run(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init { dir, trust_domain } => {
            let ca = Ca::init_dir(&dir, &trust_domain)?;
            outln!("created CA for trust domain {trust_domain}");
            outln!("  {}", dir.join("ca.pem").display());
            outln!("  {} (private, 0600: keep it off the nodes)", dir.join("ca.key").display());
            outln!("  sha256 fingerprint: {}", ca.fingerprint());
            Ok(())
        }
        CertsCmd::Issue { dir, kind, name, region, jurisdiction, provider, ttl, dns, ip } => {
            let attributes = Attributes { region, jurisdiction, provider, ..Default::default() };
            issue(&dir, kind, name, attributes, &ttl, dns, ip)
        }
    }
}

fn issue(
    dir: &std::path::Path,
    kind: PeerKind,
    name: String,
    attributes: Attributes,
    ttl: &str,
    mut dns: Vec<String>,
    mut ip: Vec<IpAddr>,
) -> Result<()> {
    let ttl: Duration = humantime::parse_duration(ttl).with_context(|| format!("--ttl {ttl:?}"))?;
    let ca = Ca::load_dir(dir)?;
    if kind == PeerKind::Coordinator && dns.is_empty() && ip.is_empty() {
        dns.push("localhost".into());
        ip.push(IpAddr::from([127, 0, 0, 1]));
        ip.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
    }
    let mut req = IssueRequest::new(kind, name, ttl);
    req.attributes = attributes;
    req.dns_names = dns;
    req.ips = ip;
    let (cert, key) = ca.issue_to_dir(dir, &req)?;
    outln!(
        "issued spiffe://{}/{}/{} (valid {})",
        ca.trust_domain,
        kind,
        req.name,
        humantime::format_duration(ttl)
    );
    outln!("  {}", cert.display());
    outln!("  {} (private, 0600)", key.display());
    Ok(())
}
