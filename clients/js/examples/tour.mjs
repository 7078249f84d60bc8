// The README's tour with the Node.js client instead of the CLI. Leave `waft dev` running, then:
//
//     npm ci --prefix clients/js                       # builds the package from proto/
//     node clients/js/examples/tour.mjs                # or pass the nodes' addresses
import waft from "../dist/index.js";

const { Client } = waft;

const show = (r) => {
  const value = Buffer.isBuffer(r.value) ? r.value.toString() : String(r.value);
  return r.ok ? value : `${r.outcome}: ${value}`;
};

const endpoints = process.argv.slice(2);
if (endpoints.length === 0) endpoints.push("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003");

const client = await Client.connect(endpoints);
console.log("talking to", client.currentEndpoint);
// waft submit --service kv 'put greeting hello'
const put = await client.submit("kv", "put greeting hello");
console.log(`put greeting: ${show(put)} at index ${put.index}`);
// waft query --service kv 'get greeting'
console.log("get greeting:", show(await client.query("kv", "get greeting")));
// waft --endpoint 127.0.0.1:7003 query --service kv 'scan' --consistency stale
if (endpoints.length > 2) {
  const node3 = await Client.connect(endpoints[2], { followLeader: false });
  console.log("node 3's copy:", show(await node3.query("kv", "scan", "stale")).trim());
  node3.close();
}
// waft submit --service kv 'cas colour red blue': refused by the guest, not an error
console.log("cas:", show(await client.submit("kv", "cas colour red blue")));
// waft cluster status
const s = await client.status();
console.log(`node ${s.node_id} is ${s.role} in term ${s.term}, leader ${s.leader_id}`);
// waft watch --service kv --from 1 --count 3
let n = 0;
for await (const event of client.watch("kv", 1)) {
  console.log(event.index, event.payload.toString(), event.outcome);
  if (++n === 3) break;
}
// waft services
for (const service of await client.services()) {
  console.log(`${service.name} version ${service.version} (${service.state_bytes} bytes of state)`);
}
client.close();
