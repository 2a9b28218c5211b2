// Reads webhook bodies, one JSON-encoded string per line, and prints one line per body
// whose JSON.stringify(JSON.parse(body)) differs from it. Prints "checked N" at the end.
"use strict";
const readline = require("readline");
const rl = readline.createInterface({ input: process.stdin });
let n = 0;
rl.on("line", (line) => {
  if (!line) return;
  const body = JSON.parse(line);
  const again = JSON.stringify(JSON.parse(body));
  n += 1;
  if (again !== body) {
    console.log("MISMATCH " + JSON.stringify({ body, again }));
  }
});
rl.on("close", () => console.log("checked " + n));
