//! The project's own experiments, built on the pipeline: the model organisms (`organism`), the
//! tiny fixture models (`fixture`), the demo that walks the whole loop on an organism (`demo`),
//! and the analyses of what an EM run did beyond accuracy (`analyze`, `em_loss`).
//!
//! Architecture invariant: a client of `em-pipeline` like any user's program. It adds no sampling
//! backend and no training step of its own: screen, train and eval run through the pipeline's
//! stages, so what the demo measures is what the command line does.

pub mod analyze;
pub mod demo;
pub mod em_loss;
pub mod fixture;
pub mod organism;
