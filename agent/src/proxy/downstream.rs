//! The client side of the proxy's HTTP/1.1: vmesh's own server (heads on httparse, body framing
//! shared with the upstream client, one task per connection and no buffer while idle, its
//! watches on one timer). HTTP/2 clients are detected by their preface and served by hyper
//! (`proxy/http.rs`).

pub mod body;
pub mod h1;
pub mod io;
pub mod park;
pub mod request;
pub mod response;
pub mod wake_gate;
pub mod watch;

pub use body::ClientBody;
pub use h1::ClientUpgrade;
