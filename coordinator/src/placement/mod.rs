//! Placement: the pure auction core (`auction.rs`: prefilter with a reason per refused
//! agent, scoring by objective, winner selection, gangs all or nothing) and the
//! `Auctioneer` actor that runs the auctions the Scheduler's core opens; and the pure
//! core of `fleetmesh plan` (`plan.rs`), whose dry-run auctions the Auctioneer runs too.

pub mod auction;
pub mod auctioneer;
pub mod plan;
