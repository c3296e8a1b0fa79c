//! End-to-end tests: real nats-server per test, all four services and the simulator.

mod bad_input;
mod cache;
mod cancel;
mod exactly_once;
mod http_faults;
mod inputs;
mod memory;
mod nats_auth;
mod ops;
mod pipeline;
mod quota;
mod retries;
mod sdk;
