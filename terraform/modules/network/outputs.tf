output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr" {
  description = "IPv4 range of the VPC."
  value       = aws_vpc.this.cidr_block
}

output "public_subnet_ids" {
  description = "Public subnets, one per availability zone, in the order of availability_zones."
  value       = aws_subnet.public[*].id
  # whatever is placed in a subnet waits for the internet route: an Elastic IP cannot be
  # associated in a VPC without an attached internet gateway
  depends_on = [aws_route_table_association.public]
}

output "public_subnets" {
  description = "Public subnets as objects with id and availability_zone."
  value       = [for s in aws_subnet.public : { id = s.id, availability_zone = s.availability_zone }]
  depends_on  = [aws_route_table_association.public]
}

output "private_subnet_ids" {
  description = "Private subnets, one per availability zone in the order of availability_zones; empty unless create_private_subnets."
  value       = aws_subnet.private[*].id
  depends_on  = [aws_route_table_association.private]
}

output "private_subnet_cidrs" {
  description = "IPv4 ranges of the private subnets, in the same order; empty unless create_private_subnets."
  value       = aws_subnet.private[*].cidr_block
}

output "availability_zones" {
  description = "Availability zones of the public subnets, in the same order."
  value       = aws_subnet.public[*].availability_zone
}

output "flow_log_group_name" {
  description = "CloudWatch log group receiving the VPC flow logs, or null when they are off."
  value       = var.enable_flow_logs ? aws_cloudwatch_log_group.flow_logs[0].name : null
}
