//! lmig-mem (skeleton; see the issue).
#![deny(unsafe_code)]
