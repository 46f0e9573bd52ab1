variable "name" {
  type        = string
  description = "Deployment name: prefix of the replication group, its subnet group, security group and the AUTH token's parameter."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of the deployment: the hosts may decrypt the token through this region's SSM only."

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region code such as us-east-1."
  }
}

variable "vpc_id" {
  type        = string
  description = "VPC of the deployment; the cache's security group belongs to it."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets the cache nodes are placed in, one per availability zone (two zones let a replica sit apart from the primary)."

  validation {
    condition     = length(var.subnet_ids) >= 1
    error_message = "subnet_ids must list at least one subnet (two, in different zones, for automatic failover)."
  }
}

variable "host_security_group_id" {
  type        = string
  description = "Security group of the GPU hosts: the only source the cache port admits, and the group that gets the matching egress rule."
}

variable "host_role_name" {
  type        = string
  description = "IAM role of the GPU hosts: it may read the AUTH token's parameter, and no other."

  validation {
    condition     = length(var.host_role_name) > 0
    error_message = "host_role_name must name the hosts' IAM role."
  }
}

variable "node_type" {
  type        = string
  description = "ElastiCache node type. Per-key counters are small: cache.t4g.micro (0.5 GiB) holds them for thousands of keys."
  default     = "cache.t4g.micro"

  validation {
    condition     = can(regex("^cache\\.[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.node_type))
    error_message = "node_type must be an ElastiCache node type such as cache.t4g.micro or cache.m7g.large."
  }
}

variable "node_count" {
  type        = number
  description = "Nodes in the replication group: one primary, the rest replicas. More than one turns on Multi-AZ with automatic failover (a replica is promoted when the primary fails)."
  default     = 1

  validation {
    condition     = var.node_count >= 1 && var.node_count <= 6 && floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number from 1 to 6 (a primary and up to five replicas)."
  }
}

variable "engine_version" {
  type        = string
  description = "Valkey version (major.minor) ElastiCache runs."
  default     = "8.0"

  validation {
    condition     = can(regex("^[78]\\.[0-9]+$", var.engine_version))
    error_message = "engine_version must be a Valkey major.minor version that ElastiCache offers, such as 7.2 or 8.0."
  }
}

variable "port" {
  type        = number
  description = "TCP port of the cache."
  default     = 6379

  validation {
    condition     = var.port >= 1024 && var.port <= 65535 && floor(var.port) == var.port
    error_message = "port must be a whole port from 1024 to 65535."
  }
}
