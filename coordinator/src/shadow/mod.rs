//! Shadow evaluation: a candidate config runs beside the active one on live traffic and
//! decides nothing; its verdicts, carried in the decision events, make a flip matrix.

pub mod flips;
pub mod runs;
