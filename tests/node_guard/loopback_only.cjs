// Preloaded into the Node processes that drive the JavaScript SDK in tests (node --require): like
// tests/network_guard for Python children, it lets sockets connect to loopback only, so a script that
// reaches out fails loudly instead of sending anything.
"use strict";
const net = require("net");

const LOOPBACK_NAMES = new Set(["localhost", "ip6-localhost", "::1"]);

function isLoopback(host) {
  const bare = String(host).replace(/^\[|\]$/g, "").replace(/^::ffff:/i, "");
  return LOOPBACK_NAMES.has(bare) || /^127\.\d+\.\d+\.\d+$/.test(bare);
}

const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  // Node calls this with (options, callback), (port, host, callback), or the array it normalized them to.
  const first = Array.isArray(args[0]) ? args[0][0] : args[0];
  let host = "localhost";
  if (first !== null && typeof first === "object") {
    if (first.path !== undefined) return connect.apply(this, args); // a Unix socket stays on this machine
    host = first.host ?? "localhost";
  } else if (typeof args[1] === "string") {
    host = args[1];
  }
  if (!isLoopback(host)) {
    throw new Error(`the test network guard allows loopback only, not ${JSON.stringify(host)}`);
  }
  return connect.apply(this, args);
};
