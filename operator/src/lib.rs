//! The concentrator operator: keeps each `Eroute` and `Egroup` status honest (`Ready=True`, or
//! `Ready=False` naming the field or the missing Secret or Eroute), and reconciles each
//! `GatewayFleet` into its gateway StatefulSet, Services, PodDisruptionBudget and rendered
//! configuration, triggered by watches ([`triggers`]).

pub mod controller;
pub mod fleet;
pub mod lease;
pub mod metrics;
pub mod status;
pub mod triggers;
