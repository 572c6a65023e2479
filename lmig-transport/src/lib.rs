//! lmig-transport (skeleton; see the issue).
#![deny(unsafe_code)]
