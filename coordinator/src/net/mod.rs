//! The network plane: the QUIC endpoint with one handler per ALPN (`listener.rs`), the
//! session actor of each connected agent (`session.rs`), and the one directory that
//! delivers messages to agents (`agent_link.rs`).

pub mod agent_link;
pub mod listener;
pub mod session;
