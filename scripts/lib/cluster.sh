# Sourced by the benchmark scripts.

# Forms a 3-node cluster of the nodes listening on 127.0.0.1:P+1, P+2 and P+3: node 1
# initializes it, adds the other two as learners and makes all three voters.
#   form_cluster "WAFT_COMMAND [FLAGS...]" P
form_cluster() {
  local bin=$1 p=$2 i
  local e=127.0.0.1:$((p + 1))
  $bin --endpoint "$e" cluster init >/dev/null
  for i in 2 3; do $bin --endpoint "$e" cluster add-learner $i 127.0.0.1:$((p + i)) >/dev/null; done
  $bin --endpoint "$e" cluster change-membership 1 2 3 >/dev/null
}
