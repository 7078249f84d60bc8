"""The README's tour with the Python client instead of the CLI. Leave `waft dev` running, then:

    pip install ./clients/python
    python3 clients/python/examples/tour.py                 # or pass the nodes' addresses
"""

import sys

from waft_client import Client


def show(result):
    value = result.value.decode(errors="replace") if isinstance(result.value, bytes) else result.value
    return value if result.ok else f"{result.outcome}: {value}"


def main(endpoints):
    with Client(endpoints) as waft:
        print("talking to", waft.current_endpoint)
        # waft submit --service kv 'put greeting hello'
        put = waft.submit("kv", "put greeting hello")
        print(f"put greeting: {show(put)} at index {put.index}")
        # waft query --service kv 'get greeting'
        print("get greeting:", show(waft.query("kv", "get greeting")))
        # waft --endpoint 127.0.0.1:7003 query --service kv 'scan' --consistency stale
        if len(endpoints) > 2:
            with Client(endpoints[2], follow_leader=False) as node3:
                print("node 3's copy:", show(node3.query("kv", "scan", "stale")).strip())
        # waft submit --service kv 'cas colour red blue': refused by the guest, not an error
        print("cas:", show(waft.submit("kv", "cas colour red blue")))
        # waft cluster status
        s = waft.status()
        print(f"node {s.node_id} is {s.role} in term {s.term}, leader {s.leader_id}")
        # waft watch --service kv --from 1 --count 3
        for n, event in enumerate(waft.watch("kv", start_index=1)):
            print(event.index, event.payload.decode(errors="replace"), event.outcome)
            if n == 2:
                break
        # waft services
        for service in waft.services():
            print(f"{service.name} version {service.version} ({service.state_bytes} bytes of state)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
