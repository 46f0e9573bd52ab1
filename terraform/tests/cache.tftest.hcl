# The shared rate-limit cache: absent for one host, present for several (or when asked), in
# private subnets, encrypted in transit and at rest, reachable from the hosts' group only, its
# AUTH token in an SSM SecureString only the hosts' role may read and no output carries.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  admin_cidrs    = ["203.0.113.7/32"]
  ssh_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
}

# ---- the root: when the cache exists -----------------------------------------------------------

run "one_host_has_no_cache_and_no_private_subnets" {
  command = plan

  assert {
    condition     = length(module.cache) == 0
    error_message = "a single gateway counts in its own process: no cache for one host"
  }
  assert {
    condition = (
      output.cache_endpoint == null && output.cache_port == null &&
      output.cache_auth_token_ssm_parameter == null && length(output.cache_subnet_cidrs) == 0
    )
    error_message = "without a cache its outputs are null (the inventory then leaves the gateways' redis_url unset)"
  }
  assert {
    condition     = length(module.network.private_subnet_ids) == 0
    error_message = "one host keeps the network it had: no private subnets"
  }
  assert {
    condition     = output.vpc_cidr == "10.42.0.0/16"
    error_message = "the VPC range is an output (nginx trusts X-Forwarded-For from it)"
  }
}

run "two_hosts_share_one_cache_in_the_private_subnets" {
  variables {
    host_count      = 2
    domain_name     = "api.example.com"
    route53_zone_id = "Z0123456789ABCDEFGHIJ"
  }

  assert {
    condition     = length(module.cache) == 1
    error_message = "more than one host must create the shared cache: one budget per key, not one per host"
  }
  assert {
    condition     = output.cache_endpoint == module.cache[0].endpoint_address && output.cache_port == 6379
    error_message = "the root must output the cache's primary endpoint and port"
  }
  assert {
    condition     = output.cache_auth_token_ssm_parameter == "/llm/gateway/redis-auth-token"
    error_message = "the root must output the NAME of the token's parameter"
  }
  assert {
    condition     = output.cache_subnet_cidrs == ["10.42.2.0/24", "10.42.3.0/24"] && length(module.network.private_subnet_ids) == 2
    error_message = "the cache's private subnets take the /24s after the two public ones, one per zone"
  }
}

run "one_host_gets_the_cache_when_asked" {
  command = plan

  variables {
    enable_shared_cache = true
  }

  assert {
    condition     = length(module.cache) == 1 && length(module.network.private_subnet_ids) == 2
    error_message = "enable_shared_cache must create the cache (and its private subnets) for a single host too"
  }
}

run "cache_settings_reach_the_module" {
  command = plan

  variables {
    enable_shared_cache = true
    cache_node_type     = "cache.m7g.large"
    cache_node_count    = 3
  }

  assert {
    condition     = module.cache[0].port == 6379
    error_message = "the module keeps the default port"
  }
}

run "bad_cache_settings_are_refused" {
  command = plan

  variables {
    cache_node_type  = "t4g.micro"
    cache_node_count = 7
  }

  expect_failures = [var.cache_node_type, var.cache_node_count]
}

run "no_cache_nodes_are_refused" {
  command = plan

  variables {
    cache_node_count = 0
  }

  expect_failures = [var.cache_node_count]
}

# ---- the module on its own -------------------------------------------------------------------

run "module_one_node_encrypted_token_required_no_failover" {
  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a", "subnet-0000000000000000b"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
  }

  assert {
    condition = (
      aws_elasticache_replication_group.this.engine == "valkey" &&
      aws_elasticache_replication_group.this.node_type == "cache.t4g.micro" &&
      aws_elasticache_replication_group.this.num_cache_clusters == 1
    )
    error_message = "by default one cache.t4g.micro node of Valkey"
  }
  assert {
    condition     = tostring(aws_elasticache_replication_group.this.at_rest_encryption_enabled) == "true"
    error_message = "the cache must be encrypted at rest"
  }
  assert {
    condition = (
      aws_elasticache_replication_group.this.transit_encryption_enabled &&
      aws_elasticache_replication_group.this.transit_encryption_mode == "required"
    )
    error_message = "the cache must require TLS (not merely offer it)"
  }
  assert {
    condition     = !aws_elasticache_replication_group.this.automatic_failover_enabled && !aws_elasticache_replication_group.this.multi_az_enabled
    error_message = "a single node has no replica to fail over to: failover and Multi-AZ off"
  }
  assert {
    condition     = aws_elasticache_subnet_group.this.subnet_ids == toset(["subnet-0000000000000000a", "subnet-0000000000000000b"]) && aws_elasticache_replication_group.this.subnet_group_name == aws_elasticache_subnet_group.this.name
    error_message = "the nodes must sit in the given (private) subnets"
  }
  assert {
    condition     = aws_ssm_parameter.auth_token.type == "SecureString" && aws_ssm_parameter.auth_token.name == "/llm/gateway/redis-auth-token"
    error_message = "the token must be kept in an SSM SecureString named after the deployment"
  }
  assert {
    condition     = nonsensitive(aws_ssm_parameter.auth_token.value == aws_elasticache_replication_group.this.auth_token)
    error_message = "the parameter must hold the very token the cache requires"
  }
  assert {
    condition     = nonsensitive(can(regex("^[0-9a-f]{64}$", aws_elasticache_replication_group.this.auth_token)))
    error_message = "the token must be 64 hex characters (ElastiCache takes 16-128 printable characters without @, \" or /)"
  }
  assert {
    condition     = issensitive(aws_elasticache_replication_group.this.auth_token) && issensitive(aws_ssm_parameter.auth_token.value)
    error_message = "the token must stay marked sensitive wherever Terraform shows it"
  }
  assert {
    condition = !contains(
      [output.endpoint_address, tostring(output.port), output.auth_token_parameter_name, output.auth_token_parameter_arn, output.security_group_id],
      nonsensitive(aws_elasticache_replication_group.this.auth_token)
    )
    error_message = "no output may carry the token"
  }
}

run "module_token_is_kept_across_plans" {
  command = plan

  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a", "subnet-0000000000000000b"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
  }

  # planned over the state of the run above: uuid() differs on this plan, so a token that were
  # not kept would be replaced, and unknown until apply
  assert {
    condition     = nonsensitive(can(regex("^[0-9a-f]{64}$", aws_elasticache_replication_group.this.auth_token)))
    error_message = "a later plan must keep the token it made first (a new one would break every gateway holding the old)"
  }
}

run "module_more_than_one_node_fails_over_across_zones" {
  command = plan

  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a", "subnet-0000000000000000b"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
    node_count             = 2
  }

  assert {
    condition = (
      aws_elasticache_replication_group.this.num_cache_clusters == 2 &&
      aws_elasticache_replication_group.this.automatic_failover_enabled &&
      aws_elasticache_replication_group.this.multi_az_enabled
    )
    error_message = "with a replica the cache must fail over automatically, across zones"
  }
}

run "module_cache_port_only_from_the_hosts_group" {
  command = plan

  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
  }

  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.from_hosts.referenced_security_group_id == "sg-0aaaaaaaaaaaaaaa1" &&
      aws_vpc_security_group_ingress_rule.from_hosts.cidr_ipv4 == null &&
      aws_vpc_security_group_ingress_rule.from_hosts.cidr_ipv6 == null &&
      aws_vpc_security_group_ingress_rule.from_hosts.prefix_list_id == null
    )
    error_message = "the cache must admit the hosts' security group and no network range"
  }
  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.from_hosts.ip_protocol == "tcp" &&
      aws_vpc_security_group_ingress_rule.from_hosts.from_port == 6379 &&
      aws_vpc_security_group_ingress_rule.from_hosts.to_port == 6379
    )
    error_message = "the cache must admit its own port (TCP 6379) and no other"
  }
  assert {
    condition     = length(aws_security_group.this.ingress) == 0 && length(aws_security_group.this.egress) == 0
    error_message = "the cache's group has no inline rules besides the one ingress rule"
  }
  assert {
    condition     = aws_elasticache_replication_group.this.security_group_ids == toset([aws_security_group.this.id])
    error_message = "the cache nodes carry that group, and only that group"
  }
  assert {
    condition = (
      aws_vpc_security_group_egress_rule.hosts_to_cache.security_group_id == "sg-0aaaaaaaaaaaaaaa1" &&
      aws_vpc_security_group_egress_rule.hosts_to_cache.referenced_security_group_id == aws_security_group.this.id &&
      aws_vpc_security_group_egress_rule.hosts_to_cache.from_port == 6379 &&
      aws_vpc_security_group_egress_rule.hosts_to_cache.to_port == 6379
    )
    error_message = "the hosts' group must be let out to the cache's group on the cache port (it sends to 80/443 only otherwise)"
  }
}

run "module_hosts_may_read_that_one_parameter_and_decrypt_it_through_ssm_only" {
  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "eu-west-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
  }

  assert {
    condition     = aws_iam_role_policy.read_auth_token.role == "llm-gpu-host-role"
    error_message = "the read policy belongs to the hosts' role"
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.read_auth_token.policy).Statement == [
      {
        Sid      = "ReadTheCacheToken", Effect = "Allow", Action = "ssm:GetParameter"
        Resource = "arn:aws:ssm:us-east-1:123456789012:parameter/llm/gateway/redis-auth-token"
      },
      {
        Sid      = "DecryptItThroughSsmOnly", Effect = "Allow", Action = "kms:Decrypt"
        Resource = "arn:aws:kms:eu-west-1:123456789012:key/*"
        Condition = { StringEquals = {
          "kms:ViaService"                      = "ssm.eu-west-1.amazonaws.com"
          "kms:EncryptionContext:PARAMETER_ARN" = "arn:aws:ssm:us-east-1:123456789012:parameter/llm/gateway/redis-auth-token"
        } }
      },
    ]
    error_message = "the hosts may read exactly the token's parameter, and decrypt only through SSM for that parameter"
  }
  assert {
    condition     = output.auth_token_parameter_arn == aws_ssm_parameter.auth_token.arn
    error_message = "the policy's resource is the parameter the module made"
  }
}

run "module_refuses_a_node_type_that_is_not_one" {
  command = plan

  module {
    source = "./modules/cache"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    vpc_id                 = "vpc-0123456789abcdef0"
    subnet_ids             = ["subnet-0000000000000000a"]
    host_security_group_id = "sg-0aaaaaaaaaaaaaaa1"
    host_role_name         = "llm-gpu-host-role"
    node_type              = "m7g.large"
    node_count             = 1.5
  }

  expect_failures = [var.node_type, var.node_count]
}

# ---- the network's private subnets ---------------------------------------------------------------

run "private_subnets_have_no_route_out" {
  module {
    source = "./modules/network"
  }

  variables {
    name                   = "llm"
    availability_zones     = ["us-east-1a", "us-east-1b"]
    create_private_subnets = true
  }

  assert {
    condition     = aws_subnet.private[*].cidr_block == ["10.42.2.0/24", "10.42.3.0/24"] && aws_subnet.private[*].availability_zone == ["us-east-1a", "us-east-1b"]
    error_message = "one private /24 per zone, after the public ones"
  }
  assert {
    condition     = alltrue([for s in aws_subnet.private : !s.map_public_ip_on_launch])
    error_message = "nothing in a private subnet gets a public address"
  }
  assert {
    condition     = length(aws_route_table.private[0].route) == 0 && length(aws_route_table_association.private) == 2
    error_message = "the private subnets' table has no route beyond the VPC's own"
  }
}
