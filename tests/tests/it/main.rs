//! End-to-end tests: real nats-server per test, all four services and the simulator.

mod pipeline;
mod quota;
mod retries;
