//! End-to-end tests: real nats-server per test, all four services and the simulator.

mod bad_input;
mod bedrock;
mod bedrock_sim;
mod cache;
mod cancel;
mod creation;
mod exactly_once;
mod http_faults;
mod inputs;
mod lifecycle;
mod memory;
mod nats_auth;
mod ops;
mod pipeline;
mod quota;
mod retries;
mod sdk;
mod settings;
mod sim_contract;
mod together;
